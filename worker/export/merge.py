"""A LoRA adapter merged into its base model as a standard Hugging Face folder, streamed
tensor by tensor so that memory follows one shard, not the model.

For each base weight the adapter trains, merged = W' + scale * B @ A, where W' is either
the weight the trained 4-bit model computed with (quantized and dequantized again with
bitsandbytes, base_weights="nf4", the default: docs/exports.md has the figures) or the
original 16-bit weight (base_weights="original"). Modules the adapter trained in full (a
classifier's head) replace or join the base's. The folder loads with
AutoModelForCausalLM (AutoModelForSequenceClassification for a classifier) and nothing of
Lathe: config.json, safetensors shards with their index, the tokenizer with the chat
template, generation_config.json when the base has one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.export.adapter_weights import AdapterMergeError, LoraAdapter
from worker.export.merge_plan import plan_merge
from worker.export.shard_writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from worker.export.stopping import ExportStopped
from worker.export.trained_quantization import TrainedQuantization
from worker.training.data import load_tokenizer

BASE_WEIGHTS = ("nf4", "original")
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GENERATION_CONFIG = "generation_config.json"
# A SentencePiece vocabulary's own model: transformers 5 saves only tokenizer.json, and
# llama.cpp's converter needs this file for the pieces' scores (worker/export/gguf.py).
SENTENCEPIECE_MODEL = "tokenizer.model"


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    shards: list[str]
    total_bytes: int
    merged_layers: int  # base weights the adapter's update was added to
    quantized_layers: int  # of all weights written, those given the 4-bit round trip
    seconds: float


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "bfloat16",
    base_weights: str = "nf4",
    quant: TrainedQuantization | None = None,
    chat_template: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str = "cpu",
    should_stop: Callable[[], bool] | None = None,
) -> MergeResult:
    """Write `base_dir` + `adapter_dir` merged into `out_dir` (absent or empty).

    `quant` is how the job quantized the base (TrainedQuantization.from_spec(job's
    QuantSpec)); `chat_template` the one the job trained with when it was not the
    tokenizer's own. `device` is where the arithmetic runs ("cuda" is faster for big
    models; the result is written from the CPU either way). `should_stop` is asked before
    each tensor: True raises ExportStopped, leaving `out_dir` partly written (the caller's
    temporary folder).
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    if base_weights not in BASE_WEIGHTS:
        raise ValueError(
            f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, not {base_weights!r}"
        )
    quant = quant or TrainedQuantization()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")
    started = time.perf_counter()
    with LoraAdapter(adapter_dir) as adapter:
        plan = plan_merge(base_dir, adapter)  # refuses a mismatch before anything is written
        writer = ShardWriter(out_dir, max_shard_bytes)
        merged = quantized = 0
        by_shard: dict[str, list[str]] = {}
        for key, (_, shard) in plan.sources.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            for key in keys:
                name = plan.sources[key][0]
                if name in adapter.full:  # trained in full: the adapter's copy wins
                    continue
                if should_stop is not None and should_stop():
                    raise ExportStopped("the merge was stopped")
                # One tensor at a time, the file opened for it alone: a mapped shard's
                # pages would otherwise stay resident (and counted) until it is closed.
                with safe_open(base_dir / shard, framework="pt") as f:
                    tensor = f.get_tensor(key)
                if name in plan.quantized and base_weights == "nf4":
                    tensor = quant.round_trip(tensor.to(device))
                    quantized += 1
                if name in adapter.layers:
                    tensor = tensor.to(device, torch.float32) + adapter.delta(name, device)
                    merged += 1
                writer.add(name, cast(tensor, dtype))
                del tensor
        for name in adapter.full:
            writer.add(name, cast(adapter.full_tensor(name), dtype))
        shards = writer.close()
    write_metadata(base_dir, out_dir, plan.config, dtype, chat_template)
    return MergeResult(
        out_dir=out_dir,
        shards=shards,
        total_bytes=writer.total_bytes,
        merged_layers=merged,
        quantized_layers=quantized,
        seconds=time.perf_counter() - started,
    )


def cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Floating tensors in the output dtype, on the CPU; integer buffers as they are."""
    if tensor.is_floating_point():
        tensor = tensor.to(OUTPUT_DTYPES[dtype])
    return tensor.cpu()


def write_metadata(
    base_dir: Path, out_dir: Path, config, dtype: str, chat_template: str | None
) -> None:
    """config.json (in the merged dtype, without any quantization), the tokenizer the job
    trained with (its chat template, a pad token; a SentencePiece model file as the base
    has it), the base's generation config."""
    tokenizer = load_tokenizer(base_dir, chat_template)
    config.dtype = OUTPUT_DTYPES[dtype]
    classifier = config.architectures[0].endswith("ForSequenceClassification")
    if classifier and getattr(config, "pad_token_id", None) is None:
        # A classifier reads each row's last token by the pad token, as it was trained.
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in (GENERATION_CONFIG, SENTENCEPIECE_MODEL):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)


__all__ = ["BASE_WEIGHTS", "AdapterMergeError", "MergeResult", "merge_adapter"]
