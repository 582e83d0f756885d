"""Settings: one pydantic-settings object, read from LATHE_* environment variables."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.domain.denied_networks import THIS_HOST, parse_denied_networks

TINY_RANDOM_LLAMA = "tiny-random-llama"

# A minimal chat template: role headers and an end marker, good for any tokenizer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class BaseModelSpec(BaseModel):
    """One base model this deployment allows fine-tuning."""

    name: str
    # Where the weights (a directory with config.json + safetensors) come from, resolved on
    # each worker by worker.model_cache.resolve_base_model:
    # - a local directory, used in place;
    # - "s3://bucket/prefix": downloaded once per worker host into the model cache
    #   (model_cache_dir, bounded by model_cache_max_gb), each object checked against its
    #   MD5 ETag and, when the prefix holds one, a SHA256SUMS file;
    # - a Hugging Face hub id "org/name" that is not a local directory: taken from the
    #   host's pre-populated HF cache (HF_HUB_CACHE, else HF_HOME/hub), never downloaded.
    # None: tiny-random-llama is generated into models_dir; any other name is models_dir/name.
    path: str | None = None
    chat_template: str | None = None
    # What kind of network it is: "causal" (a decoder: Llama, Mistral; every dataset format)
    # or "encoder" (BERT, RoBERTa, DeBERTa: classification files only). None: read from the
    # model's config.json ("architectures", "model_type", "is_decoder") when the API can
    # read it, a local directory (`path`, or models_dir/name); else causal. Declare it for an
    # s3:// or hub-id model: the API does not fetch those.
    kind: Literal["causal", "encoder"] | None = None
    # The family, as config.json's "model_type" spells it ("bert", "roberta", "llama"); it
    # picks an encoder's default LoRA targets. None: read from config.json as `kind` is.
    architecture: str | None = None
    # LoRA targets when a job names none: module names, or ["all-linear"] (peft's name for
    # every linear layer of the blocks). None: the architecture's default
    # (app/domain/architectures.py): all-linear for a decoder, as the QLoRA paper
    # recommends; the attention query and value projections for a known encoder family.
    target_modules: list[str] | None = None
    # Rough parameter count, used for memory estimates; None: counted from the shape.
    parameters: int | None = None
    # Base learning rate; a job's learning_rate_multiplier scales it.
    learning_rate: float = 2e-4
    # Shape for the GPU memory estimate. None: read from config.json as `kind` is
    # (hidden_size, num_hidden_layers, vocab_size), else guessed from `parameters`.
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None


class QuotaDefaults(BaseModel):
    """Per-team limits applied where a team has none of its own; None: unlimited."""

    max_running_jobs: int | None = None
    max_queued_jobs: int | None = 100
    max_file_bytes: int | None = None
    gpu_hours_per_month: float | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATHE_", env_nested_delimiter="__")

    home: Path = Path(".lathe")
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    base_models: list[BaseModelSpec] = Field(
        default_factory=lambda: [
            BaseModelSpec(
                name=TINY_RANDOM_LLAMA,
                chat_template=DEFAULT_CHAT_TEMPLATE,
                kind="causal",
                architecture="llama",
                parameters=130_000,
                hidden_size=64,
                num_layers=2,
                vocab_size=384,
                # Random weights and few steps: a high rate makes the loss fall visibly.
                learning_rate=1e-2,
            )
        ]
    )
    # Requests a minute per API key (0: no limit); shared across API replicas via Redis.
    rate_limit_per_minute: int = 1200
    # Webhooks: attempts per event before it is marked failed, the first retry's delay
    # (then x3 each time, at most 6 h), and each POST's timeout.
    webhook_max_attempts: int = 8
    webhook_retry_base_seconds: float = 10.0
    webhook_timeout_seconds: float = 10.0
    # Webhooks are not sent to hosts resolving into these networks: by default cloud
    # metadata (link-local) and this host itself ("this-host": every address of its
    # interfaces). Teams are internal, so private ranges are allowed; add them here to keep
    # webhooks off the internal network. 0.0.0.0/8 and :: are always denied (app/services/
    # egress.py, which also judges IPv4-mapped and other IPv4-embedding IPv6 addresses).
    webhook_denied_networks: list[str] = Field(
        default_factory=lambda: [
            "169.254.0.0/16",
            "fe80::/10",
            "127.0.0.0/8",
            "::1/128",
            THIS_HOST,
        ]
    )

    @field_validator("webhook_denied_networks")
    @classmethod
    def _networks_parse(cls, entries: list[str]) -> list[str]:
        parse_denied_networks(entries)  # the sender's own parse: ValueError names the entry
        return entries

    # How often a job's event stream (GET .../events?stream=true) looks for new events.
    event_stream_poll_seconds: float = 0.5
    # Largest upload accepted, in bytes.
    max_file_bytes: int = 8 * 1024**3
    # On S3 storage, GET /v1/files/{id}/content answers 307 to a presigned GetObject URL
    # valid this many seconds, so large files flow from S3 to the client, not through the
    # API. Clients must reach LATHE_S3_ENDPOINT_URL (or AWS) themselves. 0: off, the API
    # streams every file (always so on local storage).
    file_download_redirect_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    # How often (seconds) the training loop re-reads the job to notice a cancel; and how
    # long a cancelled or paused job's training process may take to stop before the worker
    # kills it (a step can be slow; a hung process must not hold the GPU).
    cancel_poll_seconds: float = 1.0
    stop_grace_seconds: float = 120.0
    # Resumable checkpoints besides each epoch end and a pause: every N steps (unset: off)
    # and whenever this many seconds passed since the last, so a crash loses at most that.
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = 600.0
    # Device the worker trains on: "auto" picks cuda when present.
    device: str = "auto"
    # Exports (docs/exports.md): the GPU class they run on when the request names none
    # (unset: any class with a free slot; a "cpu" class keeps them off the GPUs, since a
    # merge streams on the CPU), and the size of the merged folder's safetensors shards,
    # which bounds the worker's memory during a merge.
    export_gpu_class: str | None = None
    export_shard_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024)

    # --- Base models from object storage (an s3:// `path` in base_models) ---
    # Each worker host downloads such a model once into this directory (unset:
    # home/"model-cache"), which all its worker processes share; it must be on local disk.
    # When adding a model would take the cache past model_cache_max_gb (GB = 10^9 bytes),
    # the least recently used models not in use are evicted first.
    model_cache_dir: Path | None = None
    model_cache_max_gb: float = 200.0

    # --- GGUF exports (docs/exports.md#gguf) ---
    # llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ and gguf-py/ packages),
    # which `make install` and Dockerfile.gpu extract from the pinned llama-cpp-python
    # source distribution into the environment's share/llama.cpp.
    llama_cpp_dir: Path = Field(default_factory=lambda: Path(sys.prefix) / "share" / "llama.cpp")

    # --- The GPU pool ---
    # Classes the pool is declared to have (name -> GPU memory in GB). Workers announce
    # their own class and memory too; a job is refused when it fits no class in either
    # (announced ever, live or not), and accepted unchecked while no class is known.
    # Unset: none, except the embedded default, which declares its own worker's "cpu".
    gpu_classes: dict[str, float] | None = None
    # This worker's class, memory (GB), GPU count and name; detected when unset (GPUs: the
    # devices nvidia-smi lists, within CUDA_VISIBLE_DEVICES; a CPU worker: 1).
    worker_gpu_class: str | None = None
    worker_memory_gb: float | None = None
    worker_gpus: int | None = Field(None, ge=1, le=64)
    worker_name: str | None = None
    # Workers heartbeat this often; one silent for `worker_lease_seconds` is lost and its
    # running job goes back in line.
    heartbeat_seconds: float = 2.0
    worker_lease_seconds: float = 30.0
    # The scheduler's pass interval, and how long a dispatched task may wait for a
    # worker to claim it before it is dispatched again (with a new fencing token).
    scheduler_interval_seconds: float = 0.5
    # Run the scheduler loop inside each API process (passes are serialised by a
    # Postgres advisory lock); set false to run `lathe scheduler` on its own instead.
    scheduler_in_api: bool = True
    dispatch_timeout_seconds: float = 120.0
    # A dispatch older than this that the broker no longer holds (Redis lost it) is sent
    # again at once; older than dispatch_timeout_seconds it is sent again in any case.
    broker_check_seconds: float = 5.0
    # How often the scheduler loop removes what crashed uploads left (older than an hour).
    sweep_interval_seconds: float = 600.0
    # Fair share: usage decays with this half-life; a just-dispatched job is charged
    # at least this many GPU seconds so one pass alternates between teams.
    fair_share_half_life_hours: float = 24.0
    dispatch_charge_seconds: float = 300.0
    # Used for estimated start times until the pool has finished jobs to learn from.
    typical_job_seconds: float = 600.0
    # Preemption by fair share (docs/scheduling.md): a team below its share whose job has
    # waited `preemption_wait_seconds` takes GPUs from a team above its share. The job
    # paused for it checkpoints at its next step and resumes automatically; a job is
    # preempted at most `preemption_max_per_job` times and never within
    # `preemption_min_run_seconds` of its start or last resume.
    preemption_enabled: bool = True
    preemption_wait_seconds: float = Field(900.0, ge=0)
    preemption_max_per_job: int = Field(3, ge=0)
    preemption_min_run_seconds: float = Field(1800.0, ge=0)
    default_quotas: QuotaDefaults = Field(default_factory=QuotaDefaults)

    # --- Monitoring (docs/operations.md#monitoring) ---
    # Log lines of `lathe serve`, `lathe worker`, `lathe scheduler` and job processes:
    # "text" for a terminal, or "json" (one object a line, with request_id, team_id,
    # job_id and worker where known) for a log pipeline; docker-compose.yml sets "json".
    log_format: Literal["text", "json"] = "text"
    # Unset: GET /metrics is open (keep it off the public network). Set: it requires
    # `Authorization: Bearer <metrics_token>`, as Prometheus' `authorization` sends it.
    metrics_token: str | None = None

    # --- Experiment tracking (a job's `integrations`, docs/api.md) ---
    # Set on the API (which refuses an integration the deployment lacks) and on the workers
    # (which log the runs). MLflow: the tracking server's URI (http://mlflow:5000). W&B: the
    # API key, the host of a self-hosted server (unset: W&B's cloud), and W&B's mode
    # ("offline" writes runs to the worker's disk, no key needed: tests, air-gapped hosts).
    mlflow_tracking_uri: str | None = None
    wandb_api_key: SecretStr | None = None
    wandb_base_url: str | None = None
    wandb_mode: str | None = None

    @property
    def wandb_configured(self) -> bool:
        return self.wandb_api_key is not None or self.wandb_mode == "offline"

    @property
    def mlflow_configured(self) -> bool:
        return bool(self.mlflow_tracking_uri)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'lathe.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.home / 'objects').resolve()}"

    @property
    def embedded(self) -> bool:
        """No broker configured: `lathe serve` runs its own worker on a file-system queue."""
        return not self.broker_url

    @property
    def declared_gpu_classes(self) -> dict[str, float]:
        if self.gpu_classes is not None:
            return self.gpu_classes
        return {"cpu": 8.0} if self.embedded else {}

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "queue").resolve()

    @property
    def models_dir(self) -> Path:
        return (self.home / "models").resolve()

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.home / "model-cache").resolve()

    def base_model(self, name: str) -> BaseModelSpec | None:
        return next((m for m in self.base_models if m.name == name), None)

    def base_model_path(self, spec: BaseModelSpec) -> Path:
        return Path(spec.path) if spec.path else self.models_dir / spec.name


@lru_cache
def get_settings() -> Settings:
    return Settings()
