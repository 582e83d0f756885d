"""app.domain.memory's estimate against torch.cuda.max_memory_allocated for real training
runs of a few batch shapes on a random model with a real vocabulary (128,256) and hidden
size (2048): the estimate routes jobs to GPU classes, so it may never be below the peak.
How close it comes (issue 15's target: within 15%) is measured, not asserted: the table
goes to $GPU_CHECK_OUT/memory-estimate.json when bench/gpu_check.sh runs these tests."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import pytest

from tests.gpu import GPU

pytestmark = GPU

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=128_256,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
CONFIGS = [(1, 2048), (4, 512), (8, 1024)]  # (batch_size, max_seq_length)
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    from app.config import DEFAULT_CHAT_TEMPLATE
    from worker.training.tiny_model import ensure_model

    def build():
        tokenizer = ByT5Tokenizer()
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        config = LlamaConfig(
            **SHAPE,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            return LlamaForCausalLM(config).to(torch.bfloat16), tokenizer

    return ensure_model(tmp_path_factory.mktemp("models") / "mid-llama", build)


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "seq_len"), CONFIGS)
def test_the_estimate_is_not_below_the_measured_peak(
    mid_model: Path, tmp_path: Path, batch_size: int, seq_len: int
) -> None:
    import torch

    from app.domain.memory import adapted_matrices, estimate_memory_gb
    from bench.gpu_check import model_shape
    from worker.training.run import run_training
    from worker.training.spec import LoraSpec, TrainingHooks, TrainingSpec

    rng = random.Random(0)
    train = tmp_path / "train.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for _ in range(2 * batch_size):  # two full steps of full-length rows
            text = "".join(rng.choices(string.ascii_letters + " ", k=seq_len))
            f.write(json.dumps({"text": text}) + "\n")
    spec = TrainingSpec(
        base_model_path=mid_model,
        chat_template=None,
        data_format="text",
        train_file=train,
        valid_file=None,
        output_dir=tmp_path / "run",
        n_epochs=1,
        batch_size=batch_size,
        learning_rate=2e-4,
        max_seq_length=seq_len,
        seed=0,
        device="cuda",
    )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = run_training(spec, TrainingHooks())
    measured = torch.cuda.max_memory_allocated() / 2**30

    shape, _ = model_shape(mid_model)
    lora = LoraSpec()
    # As app.services.jobs.job_memory_gb estimates such a job (bench/gpu_check.py alike).
    estimate = estimate_memory_gb(
        shape,
        lora_r=lora.r,
        target_modules=adapted_matrices(list(lora.target_modules)),
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=True,
        attention="flash_attention_2",  # job_memory_gb's: no mask term yet
    )
    row = {
        "parameters": shape.parameters,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "estimate_gb": estimate.total_gb,
        "estimate_terms_gb": {
            "base_weights": estimate.base_weights_gb,
            "lora": estimate.lora_gb,
            "activations": estimate.activations_gb,
            "overhead": estimate.overhead_gb,
        },
        "measured_peak_gb": measured,
        "reported_peak_gb": result.reports.get("throughput", {}).get("peak_memory_gb"),
        "relative_error": (estimate.total_gb - measured) / measured,
    }
    ROWS.append(row)
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        Path(out, "memory-estimate.json").write_text(json.dumps(ROWS, indent=2) + "\n")
    print(json.dumps(row))

    assert result.step == 2
    assert estimate.total_gb >= measured, row
