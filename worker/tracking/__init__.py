"""Experiment tracking for a job's run, in the job process: MLflow and Weights & Biases,
as the job's `integrations` ask and the worker's settings allow.

`Tracking` is the one object the job process holds (worker.tracking.job_tracking); one
module per tracker beside it. mlflow and wandb are imported only when a job asks for
them, and never by the API process (worker/ is outside it).
"""

from worker.tracking.job_tracking import Tracking

__all__ = ["Tracking"]
