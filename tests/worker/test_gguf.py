"""GGUF exports (worker.export.gguf) through llama.cpp's own converter, on the tiny random
Llama with a SentencePiece vocabulary: an adapter merged, converted, and the GGUF run in
llama.cpp (llama-cpp-python) against the merged folder in plain transformers.

Real processes throughout: the converter and the quantizer run as the export runs them.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.config import DEFAULT_CHAT_TEMPLATE, get_settings
from worker.export import merge_adapter
from worker.export.gguf import (
    CHILD,
    ExportStopped,
    GgufUnsupported,
    converter_view,
    export_gguf,
)
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.sentencepiece_tokenizer import CHATML_TEMPLATE
from worker.training.spec import LoraSpec, QuantSpec
from worker.training.tiny_model import ensure_tiny_random_llama
from worker.training.tiny_sp_model import TINY_SP_LLAMA, build_tiny_llama_sp

pytestmark = pytest.mark.slow  # real training steps, and the converter's processes

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CHATS = ROOT / "app" / "data" / "sample_chat.jsonl"
TRAIN_STEPS = 100  # about 5 s on 2 cores; the loss goes from 6.6 to 1.8
NEW_TOKENS = 12
# Held-out questions (app/data/sample_chat_valid.jsonl), a second turn, and bytes the
# pieces never saw.
PROMPTS = [
    [{"role": "user", "content": "What is the capital of Chile?"}],
    [{"role": "user", "content": "What is the capital of Austria?"}],
    [{"role": "user", "content": "What is 1 + 4?"}],
    [
        {"role": "user", "content": "What is 4 + 3?"},
        {"role": "assistant", "content": "4 + 3 = 7."},
        {"role": "user", "content": "And 7 + 9?"},
    ],
    [{"role": "user", "content": "What is 9 + 9? 🙂"}],
]
# docs/exports.md#gguf states these: the largest difference between llama.cpp's logits and
# transformers' (float32, on the merged float16 folder) along each greedy path, with
# headroom over what was measured (f16 0.014, q8_0 0.20, q4_k_m 1.0). Where the reference's
# top-two margin exceeds twice the bound, no such difference can change the greedy choice.
F16_LOGITS_TOLERANCE = 0.03
Q8_0_LOGITS_TOLERANCE = 0.3
Q4_K_M_LOGITS_TOLERANCE = 1.5


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_sp(tmp_path_factory.mktemp("models") / TINY_SP_LLAMA)


@pytest.fixture(scope="module")
def merged(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained briefly on the sample chats, merged in float16.

    Trained, not random: a random model's next-token logits lie within hundredths of each
    other, and greedy decoding then turns on rounding alone (see the margins test).
    """
    tokenizer = AutoTokenizer.from_pretrained(sp_model)
    tokenizer.pad_token = tokenizer.eos_token
    chats = [json.loads(line)["messages"] for line in SAMPLE_CHATS.read_text().splitlines()]
    batch = tokenizer(
        [tokenizer.apply_chat_template(c, tokenize=False) for c in chats],
        padding=True,
        return_tensors="pt",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # Seeded (LoRA's A matrices start random, dropout draws) without touching the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = add_lora(load_quantized_base(sp_model, QuantSpec(), "cpu"), LoraSpec(r=8, alpha=16))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for step in range(TRAIN_STEPS):
            rows = slice(step * 16 % len(chats), step * 16 % len(chats) + 16)
            model(
                input_ids=batch["input_ids"][rows],
                attention_mask=batch["attention_mask"][rows],
                labels=labels[rows],
            ).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter)
    out = tmp_path_factory.mktemp("merged") / "model"
    merge_adapter(sp_model, adapter, out, dtype="float16")
    # merge_adapter writes the tokenizer as transformers 5 saves it, tokenizer.json alone;
    # the SentencePiece model, which llama.cpp takes the merge scores from, comes from the
    # base (see test_the_converter_sees_the_added_tokens_and_a_missing_sentencepiece_...).
    if not (out / "tokenizer.model").is_file():
        shutil.copyfile(sp_model / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def reference(merged: Path) -> list[dict]:
    """Each prompt's greedy path in plain transformers (the merged folder in float32), with
    the logits along it and each step's margin between the top two tokens."""
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    paths = []
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text)["input_ids"]
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            logits = model(torch.tensor([ids[:-1]])).logits[0, len(prompt) - 1 :].numpy()
        top2 = np.sort(logits, axis=-1)[:, -2:]
        paths.append(
            {
                "prompt": prompt,
                "generated": ids[len(prompt) :],
                "logits": logits,
                "margins": top2[:, 1] - top2[:, 0],
            }
        )
    return paths


@pytest.fixture(scope="module")
def exports(merged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gguf")
    return {
        q: export_gguf(merged, out / q, quantization=q, name="tiny-sp")
        for q in ("f16", "q8_0", "q4_k_m")
    }


def run_in_llama_cpp(gguf: Path, reference: list[dict]) -> list[dict]:
    """Each prompt greedy-decoded by llama.cpp (its own sampler), and llama.cpp's logits
    along transformers' path."""
    llm = Llama(
        model_path=str(gguf), n_ctx=128, n_threads=2, seed=0, logits_all=True, verbose=False
    )
    runs = []
    for path in reference:
        generated = []
        for token in llm.generate(path["prompt"], temp=0.0, reset=True):
            generated.append(token)
            if len(generated) == NEW_TOKENS:
                break
        llm.reset()
        llm.eval(path["prompt"] + path["generated"][:-1])
        logits = np.array(llm.scores[len(path["prompt"]) - 1 : llm.n_tokens])
        runs.append(
            {"generated": generated, "difference": float(np.abs(logits - path["logits"]).max())}
        )
    llm.close()
    return runs


def decisive_steps(path: dict, tolerance: float) -> int:
    """How many steps of the path precede the first whose margin is under twice
    `tolerance`: up to there, logits within `tolerance` must make the same choices."""
    close = np.nonzero(path["margins"] < 2 * tolerance)[0]
    return int(close[0]) if len(close) else NEW_TOKENS


def test_no_prompts_greedy_path_passes_a_near_tie_at_f16s_tolerance(reference: list) -> None:
    # Else an f16 rounding could fairly pick the other token (random models are full of
    # near-ties; the trained adapter leaves these paths clear of them).
    assert all(decisive_steps(path, F16_LOGITS_TOLERANCE) == NEW_TOKENS for path in reference)


def test_an_f16_gguf_greedy_decodes_the_same_tokens_as_the_merged_model(
    exports: dict, reference: list
) -> None:
    result = exports["f16"]
    assert result.tensor_types == {"F16": 16, "F32": 5}  # 7 linears x 2 blocks + 2; norms
    runs = run_in_llama_cpp(result.gguf_file, reference)

    print("f16 logit differences", [round(r["difference"], 4) for r in runs])
    for run, path in zip(runs, reference, strict=True):
        assert run["generated"] == path["generated"]
        assert run["difference"] < F16_LOGITS_TOLERANCE


def test_a_q8_0_gguf_is_within_its_stated_tolerance(exports: dict, reference: list) -> None:
    result = exports["q8_0"]
    assert result.tensor_types == {"Q8_0": 16, "F32": 5}
    assert result.gguf_bytes < 0.6 * exports["f16"].gguf_bytes
    runs = run_in_llama_cpp(result.gguf_file, reference)

    print("q8_0 logit differences", [round(r["difference"], 4) for r in runs])
    agreed = [next((i for i, (a, b) in enumerate(zip(run["generated"], path["generated"],
                    strict=True)) if a != b), NEW_TOKENS)
              for run, path in zip(runs, reference, strict=True)]  # fmt: skip
    print("q8_0 greedy tokens agreeing from the start", agreed)
    compared = 0
    for run, path in zip(runs, reference, strict=True):
        assert run["difference"] < Q8_0_LOGITS_TOLERANCE
        steps = decisive_steps(path, Q8_0_LOGITS_TOLERANCE)
        assert run["generated"][:steps] == path["generated"][:steps]
        compared += steps
    assert compared >= 15  # of 60: the rule above is not empty


def test_q4_k_m_falls_back_where_rows_are_shorter_than_a_k_quant_block(
    exports: dict, reference: list
) -> None:
    result = exports["q4_k_m"]
    # K-quants pack 256 values a block; the tiny model's rows have 64 or 128, so llama.cpp
    # stores those tensors in its fallbacks: Q5_0 for Q4_K, Q8_0 for Q6_K (the attention's
    # value and the FFN's down projection of some layers, and the output head).
    assert result.tensor_types == {"Q5_0": 13, "Q8_0": 3, "F32": 5}
    assert set(result.step_seconds) == {"convert", "quantize"}
    assert result.gguf_bytes < exports["q8_0"].gguf_bytes
    runs = run_in_llama_cpp(result.gguf_file, reference)

    print("q4_k_m logit differences", [round(r["difference"], 4) for r in runs])
    assert max(r["difference"] for r in runs) < Q4_K_M_LOGITS_TOLERANCE


def test_the_folder_holds_the_gguf_and_a_modelfile_with_the_chat_template(
    exports: dict, merged: Path
) -> None:
    result = exports["f16"]
    folder = result.gguf_file.parent
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "tiny-sp.gguf"]
    assert result.files == [folder / "tiny-sp.gguf", folder / "Modelfile"]
    modelfile = (folder / "Modelfile").read_text()
    assert re.search(r"^FROM \./tiny-sp\.gguf$", modelfile, re.M)
    assert result.modelfile_template == "chatml"
    assert 'TEMPLATE """' in modelfile and "<|im_start|>assistant\n" in modelfile
    assert re.findall(r"^PARAMETER stop (.*)$", modelfile, re.M) == [
        '"<|im_start|>"',
        '"<|im_end|>"',
    ]
    # The converter embedded the folder's chat template; llama.cpp reads it back, and its
    # tokenizer splits a chat prompt as transformers' does.
    llm = Llama(model_path=str(result.gguf_file), n_ctx=64, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(merged)
    chat = [*PROMPTS[3][:2], {"role": "user", "content": "Grüße aus Zürich 🙂  two  spaces"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"]
    llm.close()


def test_another_chat_template_goes_into_the_gguf_and_the_modelfile(
    merged: Path, tmp_path: Path
) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in merged.iterdir())

    result = export_gguf(
        merged, tmp_path / "out", quantization="q8_0", name="lathe-chat",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )  # fmt: skip

    llm = Llama(model_path=str(result.gguf_file), n_ctx=64, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    llm.close()
    assert result.modelfile_template == "lathe"
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "<|user|>" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert sorted((p.name, p.stat().st_mtime_ns) for p in merged.iterdir()) == before


def test_the_converter_sees_the_added_tokens_and_a_missing_sentencepiece_model_is_warned_about(
    merged: Path, tmp_path: Path
) -> None:
    view, warnings = converter_view(merged, tmp_path / "view", None)

    assert warnings == []
    config = json.loads((view / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["513"]["content"] == "<|im_end|>"
    assert config["added_tokens_decoder"]["513"]["special"] is True
    assert (view / "model.safetensors").resolve() == (merged / "model.safetensors").resolve()

    bare = tmp_path / "bare"
    bare.mkdir()
    for entry in merged.iterdir():
        if entry.name != "tokenizer.model":
            (bare / entry.name).symlink_to(entry)
    _, warnings = converter_view(bare, tmp_path / "bare-view", None)
    assert len(warnings) == 1 and "no tokenizer.model" in warnings[0]


def test_the_demo_models_byte_tokenizer_is_refused_with_the_reason(tmp_path: Path) -> None:
    demo = ensure_tiny_random_llama(tmp_path / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE)

    with pytest.raises(GgufUnsupported, match=r"tokenizer \(ByT5Tokenizer\).*tokenizer\.model"):
        export_gguf(demo, tmp_path / "out", quantization="f16", name="demo")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_classifier_is_refused(sp_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "classifier"
    folder.mkdir()
    config = json.loads((sp_model / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(GgufUnsupported, match="classifier"):
        export_gguf(folder, tmp_path / "out", quantization="f16", name="c")


def test_a_stop_kills_the_converter_and_leaves_nothing(merged: Path, tmp_path: Path) -> None:
    me = psutil.Process()
    seen: list[int] = []

    def command_line(process: psutil.Process) -> list[str]:
        try:
            return process.cmdline()
        except psutil.Error:  # another test's child, gone or a zombie meanwhile
            return []

    def should_stop() -> bool:
        seen.extend(c.pid for c in me.children() if str(CHILD) in command_line(c))
        return len(seen) > 0  # stop once the converter is running

    started = time.monotonic()
    with pytest.raises(ExportStopped):
        export_gguf(merged, tmp_path / "out", quantization="f16", name="x", should_stop=should_stop)

    assert seen, "the converter never ran"
    assert time.monotonic() - started < 10
    assert not any(alive(pid) for pid in seen)
    assert list((tmp_path / "out").iterdir()) == []


def test_the_converter_dies_with_the_process_that_started_it(merged: Path, tmp_path: Path) -> None:
    # A stand-in for the worker: it starts the converter as export_gguf does (the child
    # script, child_env) and is then SIGKILLed, so nothing of it can clean up.
    parent_code = (
        "import subprocess, sys, time\n"
        "from app.lifetime import child_env\n"
        "proc = subprocess.Popen(sys.argv[1:], env=child_env())\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    command = [
        sys.executable, "-c", parent_code, sys.executable, str(CHILD), "convert",
        str(get_settings().llama_cpp_dir), str(merged), str(tmp_path / "x.gguf"), "f16",
        str(tmp_path / "summary.json"),
    ]  # fmt: skip
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while alive(child) and psutil.Process(child).num_threads() < 2:  # until it watches
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert alive(child)

    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
