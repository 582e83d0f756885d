"""Exports of a fine-tuned model for serving elsewhere: the adapter merged into its base as
a plain Hugging Face folder (merge.merge_adapter). Nothing here knows about jobs, the
database or storage: paths in, a folder out."""

from worker.export.merge import BASE_WEIGHTS, MergeResult, merge_adapter
from worker.export.trained_quantization import TrainedQuantization

__all__ = ["BASE_WEIGHTS", "MergeResult", "TrainedQuantization", "merge_adapter"]
