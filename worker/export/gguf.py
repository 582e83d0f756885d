"""A merged Hugging Face folder as a GGUF file for llama.cpp and Ollama, with a Modelfile.

The conversion is llama.cpp's own: its convert_hf_to_gguf.py with its gguf package, at the
version llama-cpp-python's pinned source distribution vendors (extracted by `make install`
and Dockerfile.gpu into app.config's llama_cpp_dir). f16 and q8_0 are the converter's
own output types; q4_k_m is the f16 file quantized by llama.cpp's quantizer
(llama_model_quantize, through llama-cpp-python's C API: no llama-quantize binary).

Each step runs in a child process (worker/export/gguf_child.py) that dies with this one
(app.lifetime) and that a stop request kills: `should_stop` is polled about once a second.
Everything is written in a staging folder inside `out_dir` and moved into place at the
end, so a stopped or failed export leaves nothing behind. docs/exports.md#gguf has the
figures and the limits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.lifetime import child_env, stop_child
from worker.export.modelfile import render_modelfile
from worker.export.stopping import ExportStopped

GGUF_QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")
# What the converter writes for each; q4_k_m is then quantized from the f16 file.
CONVERTER_OUTTYPES = {"f16": "f16", "q8_0": "q8_0", "q4_k_m": "f16"}
MODELFILE = "Modelfile"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CHILD = Path(__file__).with_name("gguf_child.py")
STAGING = ".gguf-staging"
POLL_SECONDS = 1.0
KILL_GRACE_SECONDS = 5.0
LOG_TAIL_CHARS = 3000


class GgufUnsupported(ValueError):
    """The model or its tokenizer is one llama.cpp cannot convert; says what and why."""


class GgufExportError(RuntimeError):
    """The converter or the quantizer failed for another reason (the message has its
    output's tail), or the converter is not installed."""


@dataclass(frozen=True)
class GgufExport:
    files: list[Path]  # the GGUF, then the Modelfile
    quantization: str
    gguf_bytes: int
    tensors: int
    # llama.cpp's type names -> how many tensors have each ("F32": norms, "F16", "Q8_0"...):
    # q4_k_m keeps some tensors in other types (see docs/exports.md#gguf).
    tensor_types: dict[str, int]
    # The Ollama template family the Modelfile carries ("chatml", "llama3", "lathe"), or
    # None when Ollama is left to read the chat template embedded in the GGUF.
    modelfile_template: str | None
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)
    # What the owner should know about the result (a tokenizer llama.cpp may split
    # otherwise than transformers), for the export's events.
    warnings: list[str] = field(default_factory=list)

    @property
    def gguf_file(self) -> Path:
        return self.files[0]


def export_gguf(
    merged_dir: Path,
    out_dir: Path,
    *,
    quantization: str,
    name: str,
    chat_template: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    python: str = sys.executable,
    llama_cpp_dir: Path | None = None,
) -> GgufExport:
    """Write `<name>.gguf` and `Modelfile` into `out_dir` (absent or empty).

    `merged_dir` is a Hugging Face folder (worker.export.merge_adapter's output).
    `chat_template` is the one the job trained with when the folder's tokenizer does not
    carry it (it goes into the GGUF and the Modelfile). `python` runs the converter: it
    needs torch, transformers, sentencepiece and llama-cpp-python (the worker extra).
    `llama_cpp_dir` is where the converter lives; unset, the settings' llama_cpp_dir.
    """
    if quantization not in GGUF_QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(GGUF_QUANTIZATIONS)}, not {quantization!r}"
        )
    if not NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '.', '_' or '-' (at most 100): {name!r}")
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    converter = Path(llama_cpp_dir or default_llama_cpp_dir())
    if not (converter / "convert_hf_to_gguf.py").is_file():
        raise GgufExportError(
            f"llama.cpp's converter is not at {converter}: `make install` puts it there "
            "(LATHE_LLAMA_CPP_DIR points elsewhere)"
        )
    tokenizer_config = check_convertible(merged_dir)
    template = chat_template or folder_chat_template(merged_dir, tokenizer_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")

    started = time.perf_counter()
    staging = out_dir / STAGING
    staging.mkdir()
    try:
        source, warnings = converter_view(merged_dir, staging / "model", chat_template)
        steps: dict[str, float] = {}
        converted = staging / f"{name}.{CONVERTER_OUTTYPES[quantization]}.gguf"
        summary = run_step(
            "convert",
            [str(source), str(converted), CONVERTER_OUTTYPES[quantization]],
            staging, converter, python, should_stop, steps, extra=[name],
        )  # fmt: skip
        if quantization == "q4_k_m":
            quantized = staging / f"{name}.{quantization}.gguf"
            summary = run_step(
                "quantize", [str(converted), str(quantized), quantization],
                staging, converter, python, should_stop, steps,
            )  # fmt: skip
            converted.unlink()
            converted = quantized
        gguf_file = out_dir / f"{name}.gguf"
        modelfile_text, ollama = render_modelfile(
            gguf_file.name, template, token_text(tokenizer_config.get("eos_token"))
        )
        (staging / MODELFILE).write_text(modelfile_text)
        os.replace(converted, gguf_file)
        os.replace(staging / MODELFILE, out_dir / MODELFILE)
    except BaseException:
        for leftover in (out_dir / f"{name}.gguf", out_dir / MODELFILE):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return GgufExport(
        files=[gguf_file, out_dir / MODELFILE],
        quantization=quantization,
        gguf_bytes=gguf_file.stat().st_size,
        tensors=summary["tensors"],
        tensor_types=summary["types"],
        modelfile_template=ollama.family if ollama else None,
        seconds=time.perf_counter() - started,
        step_seconds=steps,
        warnings=warnings,
    )


def default_llama_cpp_dir() -> Path:
    from app.config import get_settings

    return get_settings().llama_cpp_dir


# --- Before converting: what llama.cpp cannot take --------------------------------------


def check_convertible(merged_dir: Path) -> dict:
    """Refuse what the converter is known not to take, with the reason; returns the
    folder's tokenizer_config.json ({} when there is none)."""
    config_file = merged_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{merged_dir} has no config.json: not a Hugging Face model folder")
    architecture = (json.loads(config_file.read_text()).get("architectures") or ["?"])[0]
    if architecture.endswith("ForSequenceClassification"):
        raise GgufUnsupported(
            f"the model is a classifier ({architecture}); GGUF is for llama.cpp and Ollama, "
            "which generate text: export it merged instead"
        )
    tokenizer_config = read_json(merged_dir / "tokenizer_config.json")
    if (
        not (merged_dir / "tokenizer.model").is_file()
        and not (merged_dir / "tokenizer.json").is_file()
    ):
        tokenizer = tokenizer_config.get("tokenizer_class") or "unknown"
        raise GgufUnsupported(
            f"the model's tokenizer ({tokenizer}) cannot be converted to GGUF: llama.cpp's "
            "converter reads a SentencePiece model (tokenizer.model) or a tokenizer.json "
            "(SentencePiece, byte-level BPE, WordPiece), and this model has neither"
            + (
                "; ByT5's byte tokenizer has no llama.cpp counterpart"
                if tokenizer.startswith("ByT5")
                else ""
            )
        )
    return tokenizer_config


def folder_chat_template(merged_dir: Path, tokenizer_config: dict) -> str | None:
    """The chat template the converter embeds: chat_template.jinja, else tokenizer_config's."""
    if (merged_dir / "chat_template.jinja").is_file():
        return (merged_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    return template if isinstance(template, str) else None


def converter_view(
    merged_dir: Path, view: Path, chat_template: str | None
) -> tuple[Path, list[str]]:
    """`merged_dir` as llama.cpp's converter should read it, in `view` (links to its files;
    the merged folder itself is not touched), and warnings about the tokenizer.

    The converter was written against transformers 4, which wrote the added tokens (a chat
    template's <|im_start|>) into tokenizer_config.json's added_tokens_decoder; transformers
    5 keeps them in tokenizer.json only, so they are copied over, special flags included
    (without them the converter leaves those ids as padding). `chat_template`, when given,
    replaces the folder's.
    """
    view.mkdir()
    replaced = {"tokenizer_config.json"}
    if chat_template is not None:
        replaced |= {"chat_template.jinja", "chat_template.json"}
    for entry in merged_dir.iterdir():
        if entry.name not in replaced:
            (view / entry.name).symlink_to(entry.resolve())
    config = read_json(merged_dir / "tokenizer_config.json")
    tokenizer_json = read_json(merged_dir / "tokenizer.json")
    if "added_tokens_decoder" not in config and tokenizer_json.get("added_tokens"):
        config["added_tokens_decoder"] = {
            str(token["id"]): {k: v for k, v in token.items() if k != "id"}
            for token in tokenizer_json["added_tokens"]
        }
    if chat_template is not None:
        config.pop("chat_template", None)
        (view / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (view / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    warnings = []
    model = tokenizer_json.get("model") or {}
    if (
        not (merged_dir / "tokenizer.model").is_file()
        and model.get("type") == "BPE"
        and model.get("byte_fallback")
    ):
        warnings.append(
            "the folder has a SentencePiece-style tokenizer.json but no tokenizer.model: "
            "llama.cpp's converter then gives every piece the same merge score, and llama.cpp "
            "may split words otherwise than the tokenizer the model was trained with"
        )
    return view, warnings


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def token_text(token) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


# --- The child processes ----------------------------------------------------------------


def run_step(
    step: str,
    args: list[str],
    staging: Path,
    converter: Path,
    python: str,
    should_stop: Callable[[], bool],
    steps: dict[str, float],
    extra: list[str] = (),
) -> dict:
    """Run gguf_child.py's `step` to completion (or stop); returns its summary."""
    started = time.perf_counter()
    log_file = staging / f"{step}.log"
    summary_file = staging / f"{step}.summary.json"
    env = child_env()
    env["TQDM_DISABLE"] = "1"  # the converter's progress bars would fill the log
    # The child imports app.lifetime; Lathe's folder first, wherever it is installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [python, str(CHILD), step, str(converter), *args, str(summary_file), *extra]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=staging, start_new_session=True,
        )  # fmt: skip
    try:
        while True:
            if should_stop():
                raise ExportStopped(f"the GGUF export was stopped during its {step} step")
            try:
                returncode = proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:  # stopped, or should_stop() itself raised
            stop_child(proc, signal.SIGKILL, grace_s=KILL_GRACE_SECONDS)
    steps[step] = time.perf_counter() - started
    output = log_file.read_bytes().decode("utf-8", errors="replace")
    if returncode != 0:
        raise failure(step, returncode, output)
    return json.loads(summary_file.read_text())


def failure(step: str, returncode: int, output: str) -> Exception:
    """What a failed step's output means: a model llama.cpp does not take, or a crash."""
    tail = output[-LOG_TAIL_CHARS:].strip()
    last = tail.splitlines()[-1] if tail else ""
    if step == "convert":
        unsupported = re.search(r"Model (\S+) is not supported", output)
        if unsupported:
            return GgufUnsupported(
                f"llama.cpp's converter does not support the architecture {unsupported[1]}"
            )
        if "BPE pre-tokenizer was not recognized" in output:
            return GgufUnsupported(
                "llama.cpp's converter does not recognise the tokenizer's pre-tokenizer "
                "(it knows those of the model families it lists by a hash of their output)"
            )
        if "in set_vocab" in output:  # the traceback passes through the vocabulary step
            return GgufUnsupported(f"llama.cpp's converter could not read the tokenizer: {last}")
    return GgufExportError(f"the GGUF {step} step failed (exit {returncode}): {tail}")


__all__ = [
    "GGUF_QUANTIZATIONS",
    "ExportStopped",
    "GgufExport",
    "GgufExportError",
    "GgufUnsupported",
    "export_gguf",
]
