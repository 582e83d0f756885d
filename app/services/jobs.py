"""Fine-tuning jobs as the API serves them: creation (its checks and quotas), reads, and
the team's cancel, pause and resume. The moves themselves are app.services.lifecycle's.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import BaseModelSpec, Settings
from app.domain.architectures import ModelKind
from app.domain.datasets import DatasetFormat, format_label
from app.domain.hyperparameters import DEFAULT_BETA, resolve
from app.domain.ids import new_id
from app.domain.jobs import WAITING_STATES, JobKind, JobStatus, is_final
from app.domain.memory import (
    DDP,
    FSDP,
    adapted_matrices,
    auto_parallelism,
    eligible_classes,
    estimate_memory_gb,
    fitting_classes,
    shape_from_parameters,
)
from app.domain.quotas import check_new_job
from app.domain.scheduling import waiting_for_worker
from app.errors import BadRequest, Conflict, NotFound, QuotaError
from app.models import Checkpoint, File, Job, JobEvent, Team, Worker
from app.schemas import JobCreate, QuantizationIn, TrainingIn
from app.services import lifecycle
from app.services.base_models import BaseModelFacts, describe
from app.services.events import add_event
from app.services.integrations import checked_integrations
from app.services.job_parents import ParentModel, continued_lora, resolve_parent
from app.services.locks import lock_team
from app.services.pagination import newest_first_page
from app.services.pool import online_classes, pool_classes, team_quotas
from app.services.usage import month_gpu_seconds

# Fine-tuned models' and their checkpoints' names (worker/job_training.py names them).
FINE_TUNED_PREFIX = "ft:"


def job_file(session: Session, team: Team, file_id: str, param: str) -> File:
    record = session.scalar(select(File).where(File.id == file_id, File.team_pk == team.pk))
    if record is None:
        raise BadRequest(f"{param} {file_id!r} does not exist", code="file_not_found", param=param)
    if record.purpose != "fine-tune":
        raise BadRequest(
            f"{param} {file_id!r} has purpose {record.purpose!r}; it must be 'fine-tune'",
            code="invalid_file_purpose",
            param=param,
        )
    return record


def dataset_problem(training: File, validation: File | None) -> dict | None:
    """Why these files cannot train together (an OpenAI-style error), or None."""
    if validation is not None and validation.format != training.format:
        return {
            "code": "invalid_validation_file",
            "param": "validation_file",
            "message": f"the validation file is {validation.format} but the training file is "
            f"{training.format}; both must have the same format",
        }
    return None


def check_method_fits_file(method: str, training: File) -> None:
    """Refuse, at creation, a method the training file cannot feed: DPO learns from
    preference pairs only, and a preference file has no single answer to imitate."""
    preference = training.format == DatasetFormat.PREFERENCE
    if method == "dpo" and not preference:
        raise BadRequest(
            f"method 'dpo' trains on {format_label(DatasetFormat.PREFERENCE)} files; training_file "
            f"{training.id!r} is {format_label(training.format)}: upload preference pairs, or use "
            "method 'supervised'",
            code="invalid_method_for_file",
            param="training_file",
        )
    if method == "supervised" and preference:
        raise BadRequest(
            f"training_file {training.id!r} is {format_label(training.format)}, which trains with "
            "method 'dpo'; the method is 'supervised' (send method={'type': 'dpo'})",
            code="invalid_method_for_file",
            param="training_file",
        )


def check_format_fits_model(name: str, facts: BaseModelFacts, training: File) -> None:
    """Refuse, at creation, a file the model cannot learn from: an encoder does not generate
    text, so it fine-tunes classifiers only (no chat, no preference pairs: DPO compares the
    likelihood of written answers)."""
    if facts.kind is not ModelKind.ENCODER or training.format is None:
        return
    if training.format == DatasetFormat.CLASSIFICATION:
        return
    family = f" ({facts.architecture})" if facts.architecture else ""
    why = (
        "; DPO needs a model that writes text (a decoder)"
        if training.format == DatasetFormat.PREFERENCE
        else ""
    )
    raise BadRequest(
        f"model {name!r} is an encoder{family}: it fine-tunes classifiers from "
        f"{format_label(DatasetFormat.CLASSIFICATION)} files; training_file {training.id!r} "
        f"is {format_label(training.format)}{why}",
        code="unsupported_format_for_model",
        param="training_file",
    )


def check_continues_same_task(name: str, parent: Job, training: File) -> None:
    """A classifier's adapter carries its label head: it trains on from classification files
    only, and a text model's adapter never becomes a classifier's."""
    was_classifier = parent.data_format == DatasetFormat.CLASSIFICATION
    if was_classifier == (training.format == DatasetFormat.CLASSIFICATION):
        return
    if was_classifier:
        reason = f"is a classifier: it trains on from {format_label(parent.data_format)} files only"
    else:
        reason = (
            f"writes text ({format_label(parent.data_format)}): train a classifier from its base "
            f"model, {parent.model!r}"
        )
    raise BadRequest(
        f"model {name!r} {reason}; training_file {training.id!r} is "
        f"{format_label(training.format)}",
        code="unsupported_format_for_model",
        param="training_file",
    )


def base_or_fine_tuned(settings: Settings, name: str) -> BaseModelSpec | None:
    """The base model `name` names; None for a fine-tuned model's name (resolved under the
    team's lock); a 400 for anything else."""
    base = settings.base_model(name)
    if base is not None or name.startswith(FINE_TUNED_PREFIX):
        return base
    names = ", ".join(m.name for m in settings.base_models)
    raise BadRequest(
        f"model {name!r} is not available for fine-tuning here; available: {names}, or a "
        "fine-tuned model of this team (ft:...)",
        code="model_not_found",
        param="model",
    )


def fsdp_problem(method: str, facts: BaseModelFacts, training: File) -> str | None:
    """Why the job cannot train under FSDP (a message's end), or None. The trainers shard
    a supervised causal LM only: DPO's reference pass and a classifier's head (trained in
    full, beside the adapters) run under DDP."""
    if method == "dpo":
        return "method 'dpo' trains under ddp only"
    if facts.kind is ModelKind.ENCODER or training.format == DatasetFormat.CLASSIFICATION:
        return "a classifier (an encoder, or a classification file) trains under ddp only"
    return None


def check_parallelism(body: JobCreate, problem: str | None) -> None:
    if body.parallelism == FSDP and problem is not None:
        raise BadRequest(
            f"parallelism 'fsdp' is not available for this job: {problem}; send "
            "parallelism 'ddp' or none",
            code="unsupported_parallelism",
            param="parallelism",
        )


def _batch_size_param(body: JobCreate) -> str:
    """Where the request gave its batch_size: the method's block, else the top level."""
    block = body.method and (body.method.supervised or body.method.dpo)
    if block is not None and block.hyperparameters is not None:
        if "batch_size" in block.hyperparameters.model_fields_set:
            return f"method.{body.method.type}.hyperparameters.batch_size"
    return "hyperparameters.batch_size"


def split_batch_size(body: JobCreate, requested: int | str, resolved: int) -> int:
    """The batch size, split evenly among the job's GPUs: each trains batch_size / gpus
    examples a step. "auto" is rounded up to a multiple of gpus; a given size that is not
    one is refused (rounding it would train a batch the client did not ask for)."""
    gpus = body.gpus
    if resolved % gpus == 0:
        return resolved
    multiple = -(-resolved // gpus) * gpus
    if requested == "auto":
        return multiple
    raise BadRequest(
        f"batch_size {resolved} does not split among gpus {gpus}: each GPU trains "
        f"batch_size / gpus examples a step, so batch_size must be a multiple of {gpus} "
        f"(e.g. {multiple}), or 'auto'",
        code="batch_size_not_divisible",
        param=_batch_size_param(body),
    )


@dataclass(frozen=True)
class Sizing:
    """What a job's request resolves to before it is stored: its hyperparameters ("auto"
    filled in, the batch split among its GPUs), its parallelism and its memory per GPU."""

    hyperparameters: dict
    parallelism: str | None
    memory_gb: float


def size_job(
    session: Session,
    settings: Settings,
    body: JobCreate,
    method: str,
    facts: BaseModelFacts,
    lora: dict,
    training: File,
    fsdp_allowed: bool,
) -> Sizing:
    """The request's hyperparameters, parallelism and per-GPU memory estimate, as
    create_job stores them and the dashboard's launch check shows them; BadRequest for a
    batch that does not split among the GPUs."""
    requested = body.requested_hyperparameters()
    hp = resolve(
        requested.n_epochs,
        requested.batch_size,
        requested.learning_rate_multiplier,
        examples=training.examples or 0,
    )
    batch_size = split_batch_size(body, requested.batch_size, hp.batch_size)
    hyperparameters: dict = {
        "n_epochs": hp.n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier,
    }
    if method == "dpo":
        hyperparameters["beta"] = DEFAULT_BETA if requested.beta == "auto" else requested.beta

    def per_gpu_gb(parallelism: str) -> float:
        return job_memory_gb(
            facts,
            lora,
            # DPO runs each pair's preferred and non-preferred answers in one batch: twice
            # the sequences of a supervised step (the reference pass, without gradients,
            # adds little).
            batch_size * 2 if method == "dpo" else batch_size,
            body.max_seq_length,
            body.quantization,
            body.training,
            classification=training.format == DatasetFormat.CLASSIFICATION,
            gpus=body.gpus,
            parallelism=parallelism,
        )

    parallelism = None
    if body.gpus > 1:
        parallelism = body.parallelism or auto_parallelism(
            per_gpu_gb(DDP),
            largest_class_for(session, settings, body.gpu_class, body.gpus),
            fsdp_allowed=fsdp_allowed,
        )
    return Sizing(hyperparameters, parallelism, per_gpu_gb(parallelism or DDP))


@dataclass(frozen=True)
class JobPlan:
    """A request checked and resolved as create_job stores it (app/web/launch_check.py
    shows it before submitting)."""

    base: BaseModelSpec
    parent: ParentModel | None
    training: File
    validation: File | None
    method: str
    lora: dict
    sizing: Sizing


def plan_job(session: Session, settings: Settings, team: Team, body: JobCreate) -> JobPlan:
    """Every check of the request but the quota and the pool (its model, files, method,
    format, parallelism, continued task, batch split) and what it resolves to; the
    services' BadRequest (with its `param`) for the first that fails."""
    base = base_or_fine_tuned(settings, body.model)
    parent = None
    if base is None:
        parent = resolve_parent(session, settings, team, body.model)
        base = parent.base
    training = job_file(session, team, body.training_file, "training_file")
    validation = (
        job_file(session, team, body.validation_file, "validation_file")
        if body.validation_file
        else None
    )
    method = body.method_type
    check_method_fits_file(method, training)
    facts = describe(settings, base)
    check_format_fits_model(base.name, facts, training)
    no_fsdp = fsdp_problem(method, facts, training)
    check_parallelism(body, no_fsdp)
    if parent is not None:
        check_continues_same_task(body.model, parent.job, training)
        lora = continued_lora(body.lora, parent.job)
    else:
        lora = body.lora.model_dump()
    lora["target_modules"] = lora["target_modules"] or list(facts.target_modules)
    sizing = size_job(session, settings, body, method, facts, lora, training, no_fsdp is None)
    return JobPlan(base, parent, training, validation, method, lora, sizing)


def create_job(session: Session, settings: Settings, team: Team, body: JobCreate) -> Job:
    integrations = checked_integrations(settings, body.integrations or [])
    base_or_fine_tuned(settings, body.model)  # an unknown model is refused before the lock
    # The team's lock, before the files are read: a concurrent DELETE of one (which takes
    # it too) either finished first, and the file is gone, or waits and sees this job.
    lock_team(session, team)
    plan = plan_job(session, settings, team, body)
    base, parent, training, validation = plan.base, plan.parent, plan.training, plan.validation
    method, lora, sizing = plan.method, plan.lora, plan.sizing
    check_new_job_quota(session, settings, team)
    classes = check_fits_pool(session, settings, body.gpu_class, sizing.memory_gb, gpus=body.gpus)
    job = Job(
        id=new_id("ftjob"),
        team_pk=team.pk,
        model=base.name,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        status=JobStatus.VALIDATING_FILES.value,
        method=method,
        hyperparameters=sizing.hyperparameters,
        parent=parent.parent if parent else None,
        lineage=parent.lineage if parent else [base.name],
        integrations=integrations,
        lora=lora,
        quantization=body.quantization.model_dump(),
        training=body.training.model_dump(),
        max_seq_length=body.max_seq_length,
        data_format=training.format,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        result_files=[],
        priority=body.priority,
        gpu_class=body.gpu_class,
        memory_gb=round(sizing.memory_gb, 3),
        gpus=body.gpus,
        parallelism=sizing.parallelism,
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        job.pk,
        f"Validating training file: {training.id}",
        data={
            "method": job.method,
            "hyperparameters": job.hyperparameters,
            "lora": job.lora,
            "quantization": job.quantization,
            "training": job.training,
            "max_seq_length": job.max_seq_length,
            "priority": job.priority,
            "gpu_class": job.gpu_class,
            "memory_gb": job.memory_gb,
            "gpus": job.gpus,
            "parallelism": job.parallelism,
        },
    )
    if parent is not None:
        add_event(
            session,
            job.pk,
            f"Training on from {body.model} (job {parent.job.id}); lineage: "
            + " -> ".join(job.lineage),
            data={k: v for k, v in parent.parent.items() if k != "storage_key"},
        )
    problem = dataset_problem(training, validation)
    if problem:
        lifecycle.fail(
            session,
            job,
            problem["code"],
            problem["message"],
            param=problem["param"],
            event=f"Job failed: {problem['message']}",
        )
    else:
        note_if_no_worker(session, settings, job, classes)
        lifecycle.queue(session, job, training=training)
    session.commit()
    return job


def note_if_no_worker(
    session: Session, settings: Settings, job: Job, classes: dict[str, float] | None = None
) -> None:
    """Tell the job's owner, in its events, when no worker that could take it is online:
    it is accepted and waits, but it will not start until one registers."""
    if classes is None:
        classes = pool_classes(session, settings)
    eligible = eligible_classes(job.gpu_class, job.memory_gb, classes)
    notice = waiting_for_worker(eligible, online_classes(session, settings))
    if notice:
        add_event(session, job.pk, notice, level="warn")


def job_memory_gb(
    facts: BaseModelFacts,
    lora: dict,
    batch_size: int,
    seq_len: int,
    quant: QuantizationIn,
    training: TrainingIn,
    *,
    classification: bool = False,
    gpus: int = 1,
    parallelism: str | None = None,
) -> float:
    """The job's peak memory on each of its GPUs (Job.memory_gb, which the scheduler
    compares with a class's memory); `batch_size` is the whole batch, shared by `gpus`."""
    # A model of unknown shape is taken for a 7B decoder: generous, as the estimate means to be.
    shape = facts.shape or shape_from_parameters(facts.parameters or 7_000_000_000)
    if facts.kind is ModelKind.ENCODER and facts.max_positions:
        # The worker cuts an encoder's input there (BERT reads at most 512 tokens); a
        # decoder's positions stretch, and its examples are cut at max_seq_length only.
        seq_len = min(seq_len, facts.max_positions)
    return estimate_memory_gb(
        shape,
        lora_r=lora["r"],
        target_modules=adapted_matrices(lora["target_modules"], facts.kind),
        batch_size=batch_size,
        seq_len=seq_len,
        double_quant=quant.double_quant,
        # The estimate is for a GPU, where "auto" turns checkpointing on.
        gradient_checkpointing=training.gradient_checkpointing is not False,
        classification=classification,
        # The levers' terms (memory.lever_settings: one micro-batch, the attention's mask)
        # wait for the GPU check's measurements; until then the estimate keeps its earlier
        # form: the whole batch's activations and no attention mask.
        attention="flash_attention_2",
        gpus=gpus,
        parallelism=parallelism or DDP,
    ).total_gb


def class_host_gpus(session: Session, settings: Settings) -> dict[str, int]:
    """Per class the pool knows, the most GPUs one of its hosts has: the largest any worker
    of it ever announced (live or not, as pool_classes counts memory); a declared class no
    worker has announced counts as hosts of one GPU."""
    hosts = dict.fromkeys(settings.declared_gpu_classes, 1)
    announced = session.execute(
        select(Worker.gpu_class, func.max(Worker.gpus)).group_by(Worker.gpu_class)
    )
    for gpu_class, gpus in announced:
        hosts[gpu_class] = max(hosts.get(gpu_class, 1), int(gpus or 1))
    return hosts


def largest_class_for(
    session: Session, settings: Settings, gpu_class: str | None, gpus: int
) -> float | None:
    """The memory of the largest known class whose hosts have `gpus` GPUs (the asked
    class, when the job names one); None when there is none (the job waits, or is refused
    by check_fits_pool)."""
    classes = pool_classes(session, settings)
    hosts = class_host_gpus(session, settings)
    able = [
        memory_gb
        for name, memory_gb in classes.items()
        if hosts.get(name, 1) >= gpus and gpu_class in (None, name)
    ]
    return max(able, default=None)


def check_fits_pool(
    session: Session,
    settings: Settings,
    gpu_class: str | None,
    memory_gb: float,
    *,
    gpus: int = 1,
) -> dict[str, float]:
    """Refuse, at creation, a job no class the pool knows can run: it would wait forever.
    `memory_gb` is per GPU; a job of `gpus` GPUs needs a class whose hosts have as many.

    The pool knows the declared classes and every class a worker has ever announced, so
    a job is accepted while its class's workers are all down (a rolling restart, a pool
    scaled to zero). A pool that knows no class at all (a fresh one, nothing declared)
    accepts every job: it waits for the first worker. Returns the known classes (without
    a gpu_class: those whose hosts have the job's GPUs)."""
    classes = pool_classes(session, settings)
    if not classes:
        return classes
    hosts = class_host_gpus(session, settings) if gpus > 1 else {}
    if gpu_class is not None:
        if gpu_class not in classes:
            raise BadRequest(
                f"gpu_class {gpu_class!r} is not in this pool; classes: "
                + (", ".join(sorted(classes)) or "none"),
                code="unknown_gpu_class",
                param="gpu_class",
            )
        if hosts.get(gpu_class, 1) < gpus:
            raise BadRequest(
                f"the job asks for {gpus} GPUs of one host; the largest host of gpu_class "
                f"{gpu_class!r} seen has {hosts.get(gpu_class, 1)}; lower gpus, or choose "
                "a class with larger hosts",
                code="insufficient_gpus",
                param="gpus",
            )
        if classes[gpu_class] < memory_gb:
            raise BadRequest(
                f"the job needs about {memory_gb:.1f} GB of GPU memory"
                + (" on each GPU" if gpus > 1 else "")
                + f" but gpu_class "
                f"{gpu_class!r} has {classes[gpu_class]:.0f} GB; lower batch_size or "
                "max_seq_length, or choose a larger class",
                code="insufficient_gpu_memory",
                param="gpu_class",
            )
        return classes
    if gpus > 1:
        able = {name: gb for name, gb in classes.items() if hosts.get(name, 1) >= gpus}
        if not able:
            most, name = max((n, name) for name, n in hosts.items() if name in classes)
            raise BadRequest(
                f"the job asks for {gpus} GPUs of one host; the largest host this pool has "
                f"seen has {most} (gpu_class {name!r}); lower gpus",
                code="insufficient_gpus",
                param="gpus",
            )
        classes = able
    if not fitting_classes(memory_gb, classes):
        largest = max(classes.items(), key=lambda kv: kv[1])
        where = "in this pool" if gpus == 1 else f"with hosts of {gpus} GPUs"
        raise BadRequest(
            f"the job needs about {memory_gb:.1f} GB of GPU memory"
            + (" on each GPU" if gpus > 1 else "")
            + f"; the largest class {where}, {largest[0]!r}, has {largest[1]:.0f} GB; "
            "lower batch_size or max_seq_length",
            code="insufficient_gpu_memory",
            param="max_seq_length",
        )
    return classes


def check_new_job_quota(
    session: Session, settings: Settings, team: Team, *, already_waiting: bool = False
) -> None:
    # Concurrent creations of one team count and insert one at a time, on both databases.
    lock_team(session, team)
    quotas = team_quotas(team, settings)
    waiting = 0
    if not already_waiting:
        waiting = session.scalar(
            select(func.count()).where(
                Job.team_pk == team.pk, Job.status.in_([s.value for s in WAITING_STATES])
            )
        )
    exceeded = check_new_job(quotas, waiting or 0, month_gpu_seconds(session, team))
    if exceeded is not None:
        raise QuotaError(exceeded)


def get_job(session: Session, team: Team, job_id: str) -> Job:
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.team_pk == team.pk, Job.kind == JobKind.FINE_TUNE)
    )
    if job is None:
        raise NotFound(
            f"no fine-tuning job with id {job_id!r}",
            code="job_not_found",
            param="fine_tuning_job_id",
        )
    return job


def list_jobs(session: Session, team: Team, limit: int, after: str | None):
    scope = (Job.team_pk == team.pk) & (Job.kind == JobKind.FINE_TUNE)
    return newest_first_page(session, Job, scope, limit, after)


def not_cancellable(job: Job, param: str = "fine_tuning_job_id") -> Conflict:
    """The 409 for cancelling a job that has ended (the team's and the admin's cancel)."""
    return Conflict(
        f"job {job.id} has already ended ({job.status}); it cannot be cancelled",
        code="job_not_cancellable",
        param=param,
    )


def cancel_job(session: Session, team: Team, job_id: str) -> Job:
    job = get_job(session, team, job_id)
    if is_final(JobStatus(job.status)):
        raise not_cancellable(job)
    if not lifecycle.cancel(session, job, actor="team"):
        session.rollback()  # it ended between the read and the update
        raise not_cancellable(get_job(session, team, job_id))
    session.commit()
    return job


def pause_job(session: Session, team: Team, job_id: str) -> Job:
    """Queued: taken out of line. Running: the worker stops within a few steps, keeping
    the job's checkpoints; resume puts it back in line to continue from the last one."""
    job = get_job(session, team, job_id)
    if job.status == JobStatus.PAUSED and job.preempted_at is not None:
        # Preempted by the scheduler, which would resume it: now it waits for its team.
        lifecycle.keep_paused(session, job)
        session.commit()
        return job
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise Conflict(
            f"job {job.id} is {job.status}; only a queued or running job can be paused",
            code="job_not_pausable",
            param="fine_tuning_job_id",
        )
    if not lifecycle.pause(session, job):
        session.rollback()
        raise Conflict(f"job {job.id} changed state; try again", code="job_not_pausable")
    session.commit()
    return job


def resume_job(session: Session, settings: Settings, team: Team, job_id: str) -> Job:
    job = get_job(session, team, job_id)
    if job.status != JobStatus.PAUSED:
        raise Conflict(
            f"job {job.id} is {job.status}; only a paused job can be resumed",
            code="job_not_paused",
            param="fine_tuning_job_id",
        )
    holder = job.worker if job.devices is not None else None
    if holder is not None:
        raise Conflict(
            f"job {job.id} is still stopping on worker {holder} (saving its checkpoint); "
            "resume it in a few seconds",
            code="job_still_stopping",
            param="fine_tuning_job_id",
        )
    # A paused job already counts as waiting; only the GPU-hours quota can refuse it.
    check_new_job_quota(session, settings, team, already_waiting=True)
    if not lifecycle.resume(session, job):
        session.rollback()
        raise Conflict(f"job {job.id} changed state; try again", code="job_not_paused")
    note_if_no_worker(session, settings, job)
    session.commit()
    return job


def list_events(session: Session, team: Team, job_id: str, limit: int, after: str | None):
    job = get_job(session, team, job_id)
    return newest_first_page(session, JobEvent, JobEvent.job_pk == job.pk, limit, after)


def list_checkpoints(session: Session, team: Team, job_id: str, limit: int, after: str | None):
    job = get_job(session, team, job_id)
    return newest_first_page(session, Checkpoint, Checkpoint.job_pk == job.pk, limit, after)


def get_checkpoint(session: Session, team: Team, job_id: str, checkpoint_id: str) -> Checkpoint:
    """One of the team's job's checkpoints; another job's (another team's) is not found."""
    job = get_job(session, team, job_id)
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_pk == job.pk)
    )
    if checkpoint is None:
        raise NotFound(
            f"fine-tuning job {job.id} has no checkpoint with id {checkpoint_id!r}",
            code="checkpoint_not_found",
            param="checkpoint_id",
        )
    return checkpoint
