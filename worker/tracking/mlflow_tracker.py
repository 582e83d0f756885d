"""MLflow: one run per job, in the experiment the job names, on the tracking server the
operator configures (LATHE_MLFLOW_TRACKING_URI).

Through MlflowClient (no fluent global "active run"), so that nothing else in the process
can end or reuse the run. Every call may raise; worker.tracking.job_tracking catches.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.domain.jobs import JobStatus
from worker.tracking.job_facts import JobFacts

# MLflow's client retries a failed request 7 times with exponential backoff and waits
# 120 s for each answer: a tracking server that is down would hold the training loop for
# minutes at the first call. These bound it to seconds (the first failure stops the
# tracker for the rest of the run). Set only where the operator has not chosen: MLflow
# reads them from the environment at every request.
BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# The adapter's upload is one PUT of the whole archive (hundreds of MB for a large model's
# adapter, through a server that may proxy it to S3): it gets its own, longer wait.
ARTIFACT_TIMEOUT_S = "600"

# A job's end as MLflow's run status. A paused job will resume the same run (`start` finds
# it by its lathe.job_id tag): SCHEDULED, MLflow's "waiting to run".
RUN_STATUS = {
    JobStatus.SUCCEEDED: "FINISHED",
    JobStatus.FAILED: "FAILED",
    JobStatus.PAUSED: "SCHEDULED",
}
JOB_ID_TAG = "lathe.job_id"


class MlflowTracker:
    name = "MLflow"
    key = "mlflow"  # in the job's stats.tracking

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str | None, job: JobFacts
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name or job.job_id
        self.job = job
        self.client: Any = None
        self.run_id: str | None = None

    def start(self) -> dict[str, Any]:
        for name, value in BOUNDED_HTTP.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment_id()
        earlier = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{JOB_ID_TAG}` = '{self.job.job_id}'",
            max_results=1,
        )
        if earlier:  # an earlier attempt of this job (paused, or its worker was lost)
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {
                JOB_ID_TAG: self.job.job_id,
                "lathe.team": self.job.team,
                "lathe.base_model": self.job.base_model,
                "lathe.method": self.job.method,
            }
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            # Once per run: MLflow refuses a param logged again with another value.
            self.client.log_batch(
                self.run_id, params=[Param(k, v) for k, v in self.job.params.items()]
            )
        self.client.set_tag(self.run_id, "lathe.status", "running")
        return {
            "url": self._run_url(experiment_id),
            "run_id": self.run_id,
            "experiment_id": experiment_id,
        }

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # another job created it meanwhile
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _run_url(self, experiment_id: str) -> str | None:
        """The run's page in MLflow's UI; only an HTTP server has one."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        # The URL is shown to the team (job, events, dashboard): never the credentials a
        # tracking URI may carry (https://user:password@host).
        parts = urlsplit(self.tracking_uri.rstrip("/"))
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        return f"{base}/#/experiments/{experiment_id}/runs/{self.run_id}"

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        at = int(time.time() * 1000)
        metrics = [Metric(key, value, at, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_report(self, kind: str, data: dict) -> None:
        self.client.log_dict(self.run_id, data, f"lathe/{kind}.json")

    def log_artifact(self, path: Path) -> None:
        with _request_timeout(ARTIFACT_TIMEOUT_S):
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_tag(self.run_id, "lathe.status", status)
        run_status = RUN_STATUS.get(status, "KILLED")  # cancelled
        if run_status == "SCHEDULED":
            self.client.update_run(self.run_id, status=run_status)
        else:
            self.client.set_terminated(self.run_id, status=run_status)


@contextmanager
def _request_timeout(seconds: str):
    """MLflow's per-request timeout raised for the block, unless the operator set their
    own (then theirs holds throughout). MLflow reads it at every request; the job process
    logs from one thread, so nothing else sees the change."""
    name = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    ours = os.environ.get(name) == BOUNDED_HTTP[name]
    if ours:
        os.environ[name] = seconds
    try:
        yield
    finally:
        if ours:
            os.environ[name] = BOUNDED_HTTP[name]
