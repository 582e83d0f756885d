"""Merged exports (worker.export): the adapter added to the weights the 4-bit model trained
with, written as a plain Hugging Face folder shard by shard, on the tiny random Llama."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.export import merge_adapter
from worker.export.adapter_weights import AdapterMergeError
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.spec import LoraSpec, QuantSpec
from worker.training.tiny_model import ensure_tiny_random_llama

ROOT = Path(__file__).resolve().parents[2]
# docs/exports.md states these: the nf4 merge in float32 is the trained model's own weights
# (float arithmetic apart); in bfloat16 each weight is rounded once more.
NF4_FLOAT32_TOLERANCE = 1e-4
NF4_BFLOAT16_TOLERANCE = 0.1
TEXT = "<|user|>What is the capital of Chile?<|assistant|>The capital of Chile is Santiago."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


def randomize_lora(model: PeftModel, seed: int) -> None:
    """Move every LoRA B (zero at init) and any head off its start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.data.copy_(noise.to(param.dtype))


def save_adapter(tiny_model: Path, out: Path, *, classes: list[str] | None = None) -> Path:
    base = load_quantized_base(tiny_model, QuantSpec(), "cpu", classes=classes)
    model = add_lora(base, LoraSpec(r=8, alpha=16), classification=classes is not None)
    randomize_lora(model, seed=1)
    model.save_pretrained(out)
    if classes is not None:
        (out / "classes.json").write_text(json.dumps(classes))
    return out


@pytest.fixture(scope="module")
def chat_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))


def input_ids(model_dir: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt")["input_ids"]


@torch.no_grad()
def trained_logits(tiny_model: Path, adapter: Path, *, classes: list[str] | None = None):
    """What the job's model computes: the 4-bit base with the adapter on top."""
    base = load_quantized_base(tiny_model, QuantSpec(), "cpu", classes=classes)
    if classes is not None:
        base.config.pad_token_id = 0
    return PeftModel.from_pretrained(base, adapter).eval()(input_ids(tiny_model)).logits.float()


@torch.no_grad()
def merged_logits(out: Path, auto_class=AutoModelForCausalLM) -> torch.Tensor:
    model = auto_class.from_pretrained(out, dtype=torch.float32, trust_remote_code=False)
    return model.eval()(input_ids(out)).logits.float()


@pytest.fixture(scope="module")
def reference(tiny_model: Path, chat_adapter: Path) -> torch.Tensor:
    return trained_logits(tiny_model, chat_adapter)


def test_an_nf4_merge_in_float32_computes_what_the_4bit_model_trained(
    tiny_model: Path, chat_adapter: Path, reference: torch.Tensor, tmp_path: Path
) -> None:
    result = merge_adapter(tiny_model, chat_adapter, tmp_path / "out", dtype="float32")

    assert result.merged_layers == 14 and result.quantized_layers == 14  # 7 linears x 2 blocks
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and "quantization_config" not in config
    difference = (merged_logits(tmp_path / "out") - reference).abs().max().item()
    assert difference < NF4_FLOAT32_TOLERANCE


def test_an_nf4_merge_in_bfloat16_is_within_the_stated_tolerance_and_original_is_further_off(
    tiny_model: Path, chat_adapter: Path, reference: torch.Tensor, tmp_path: Path
) -> None:
    merge_adapter(tiny_model, chat_adapter, tmp_path / "nf4", dtype="bfloat16")
    merge_adapter(
        tiny_model, chat_adapter, tmp_path / "original", dtype="bfloat16", base_weights="original"
    )

    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")  # as a server would
    assert loaded.dtype == torch.bfloat16
    nf4 = (merged_logits(tmp_path / "nf4") - reference).abs().max().item()
    original = (merged_logits(tmp_path / "original") - reference).abs().max().item()
    assert nf4 < NF4_BFLOAT16_TOLERANCE
    assert original > 5 * nf4, (original, nf4)


def test_small_shards_are_written_with_an_index_and_one_shard_without(
    tiny_model: Path, chat_adapter: Path, tmp_path: Path
) -> None:
    sharded = merge_adapter(tiny_model, chat_adapter, tmp_path / "sharded", max_shard_bytes=50_000)
    single = merge_adapter(tiny_model, chat_adapter, tmp_path / "single")

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(sharded.shards) > 3
    assert sorted(set(index["weight_map"].values())) == sharded.shards
    assert all((tmp_path / "sharded" / name).is_file() for name in sharded.shards)
    assert index["metadata"]["total_size"] == sharded.total_bytes
    assert not list((tmp_path / "sharded").glob(".shard-*"))
    assert single.shards == ["model.safetensors"]
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()


def test_the_folder_carries_the_tokenizer_chat_template_and_generation_config(
    tiny_model: Path, chat_adapter: Path, tmp_path: Path
) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    merge_adapter(tiny_model, chat_adapter, tmp_path / "out", chat_template=template)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == template
    assert (
        tokenizer("abc")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_model)("abc")["input_ids"]
    )
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_a_classifier_merges_into_a_sequence_classification_folder(
    tiny_model: Path, tmp_path: Path
) -> None:
    classes = ["neg", "pos"]
    adapter = save_adapter(tiny_model, tmp_path / "adapter", classes=classes)

    merge_adapter(tiny_model, adapter, tmp_path / "out", dtype="float32")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    merged = merged_logits(tmp_path / "out", AutoModelForSequenceClassification)
    reference = trained_logits(tiny_model, adapter, classes=classes)
    assert merged.shape == (1, 2)
    assert (merged - reference).abs().max().item() < NF4_FLOAT32_TOLERANCE


def test_a_classifier_without_its_class_names_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_model, tmp_path / "adapter", classes=["a", "b"])
    (adapter / "classes.json").unlink()

    with pytest.raises(AdapterMergeError, match="classes.json"):
        merge_adapter(tiny_model, adapter, tmp_path / "out")


def test_an_adapter_of_another_base_is_refused_before_anything_is_written(
    tiny_model: Path, chat_adapter: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(other)
    for name in ("tokenizer_config.json", "added_tokens.json", "chat_template.jinja"):
        if (tiny_model / name).is_file():
            (other / name).write_bytes((tiny_model / name).read_bytes())

    with pytest.raises(AdapterMergeError, match="model.layers.1"):
        merge_adapter(other, chat_adapter, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


# --- memory ---------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from worker.export import merge_adapter

    def rss(field):
        status = Path("/proc/self/status").read_text().splitlines()
        line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    tiny, tiny_adapter, base, adapter, out = map(Path, sys.argv[1:6])
    shard = int(sys.argv[6])
    # Everything imported and warmed up on the tiny model first: growth after is the merge's.
    merge_adapter(tiny, tiny_adapter, out / "warm")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = rss("VmRSS")
    merge_adapter(base, adapter, out / "big", dtype="float32", max_shard_bytes=shard)
    print(json.dumps({"growth": rss("VmHWM") - before}))
    """
)


def write_random_llama(path: Path, *, shard_bytes: int) -> tuple[LlamaForCausalLM, int]:
    """A float32 random Llama of about 270 MB in many shards, and the largest tensor's bytes."""
    config = LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size=shard_bytes)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return model, largest


def test_memory_follows_one_shard_not_the_model(
    tiny_model: Path, chat_adapter: Path, tmp_path: Path
) -> None:
    shard = 8 * 1024**2
    base = tmp_path / "base"
    llama, largest = write_random_llama(base, shard_bytes=shard)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    model = add_lora(llama, LoraSpec(r=8, alpha=16))
    randomize_lora(model, seed=2)
    model.save_pretrained(tmp_path / "adapter")
    del llama, model

    child = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tiny_model), str(chat_adapter), str(base),
         str(tmp_path / "adapter"), str(tmp_path), str(shard)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert child.returncode == 0, child.stderr[-3000:]
    growth = json.loads(child.stdout.strip().splitlines()[-1])["growth"]
    print(f"growth {growth / 1e6:.1f} MB, model {model_bytes / 1e6:.1f} MB")
    assert model_bytes > 260e6 and largest <= 4 * 1024**2
    # The shard being gathered and its copy while written, a few copies of one weight (its
    # 4-bit round trip, the update), the allocator's slack (measured: about 60 MB): half
    # of the merged model (float32, as big as the base), which a merge holding it all needs.
    bound = 2 * shard + 10 * largest + 16e6
    assert bound < model_bytes / 2
    assert growth < bound, (growth, model_bytes)
