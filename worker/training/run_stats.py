"""What a run reports besides its losses (the job's `stats` and events): token counts,
accuracy, throughput, a sample."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

from app.domain.classification import classification_report
from app.domain.memory import GB
from worker.training.data import IGNORE_INDEX, TokenizedFile, chat_prompt, read_jsonl


def token_summary(train: TokenizedFile, valid: TokenizedFile | None, max_seq_length: int) -> str:
    """One line: what an epoch costs in tokens, and what was cut to max_seq_length."""
    parts = []
    for name, tokenized in (("training", train), ("validation", valid)):
        if tokenized is None:
            continue
        c = tokenized.counts
        text = f"{name} file: {c.examples:,} examples, {c.tokens:,} tokens per epoch"
        if c.trained_tokens:
            text += f" ({c.trained_tokens:,} with a loss)"
        if c.truncated:
            text += f", {c.truncated} truncated to {max_seq_length} tokens"
        if c.dropped:
            text += f", {c.dropped} dropped (nothing left to train on)"
        parts.append(text)
    return "Tokenized " + "; ".join(parts)


def predicted_ids(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax of each evaluation batch's logits: the accuracy needs no more,
    and a vocabulary-wide float per token would pile up in memory over the eval set."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def mean_token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """compute_metrics for language modelling: the share of trained tokens predicted
    exactly (OpenAI's mean token accuracy)."""
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    # Position t predicts token t + 1; -100 marks prompts, padding and example starts.
    predicted, wanted = predictions[:, :-1], labels[:, 1:]
    scored = wanted != IGNORE_INDEX
    right = (predicted[scored] == wanted[scored]).sum()
    return {"mean_token_accuracy": float(right / max(int(scored.sum()), 1))}


class ClassificationMetrics:
    """compute_metrics for a classifier: accuracy and macro-F1 at each evaluation.

    The whole report of the latest evaluation (per class, confusion matrix) is kept: the
    last one is the run's final report, with no second pass over the validation file.
    """

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self.last_report: dict | None = None

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(prediction.predictions).reshape(-1).tolist()
        labels = np.asarray(prediction.label_ids).reshape(-1).tolist()
        self.last_report = classification_report(self.classes, labels, predictions)
        return {
            "accuracy": self.last_report["accuracy"],
            "macro_f1": self.last_report["macro_f1"],
        }


def peak_memory(device: str) -> tuple[float, str]:
    """(GB, what was measured): the GPU's peak allocation, or on the CPU the process's
    peak resident memory (which includes Python, torch and the base model)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GB, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, "process_max_rss"


def throughput(tokens: int, seconds: float, device: str) -> dict:
    memory_gb, measured = peak_memory(device)
    return {
        "tokens": int(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "peak_memory_gb": round(memory_gb, 3),
        "peak_memory_source": measured,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def throughput_summary(stats: dict) -> str:
    return (
        f"Trained {stats['tokens']:,} tokens in {stats['seconds']:.1f} s "
        f"({stats['tokens_per_second'] or 0:,.0f} tokens/s); peak memory "
        f"{stats['peak_memory_gb']:.2f} GB ({stats['peak_memory_source']})"
    )


def generation_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, max_new_tokens: int
) -> dict:
    """The trained model's greedy answer to the first conversation of `path`, cut before
    its last assistant turn, beside the answer the data gives (a preference pair's: the
    preferred one)."""
    line, record = read_jsonl(path)[0]
    if "input" in record:
        messages = record["input"]["messages"] + record["preferred_output"]
    else:
        messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = chat_prompt(messages[:last], tokenizer)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    completion = tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return {
        "line": line,
        "prompt": messages[last - 1]["content"] if last else "",
        "expected": messages[last]["content"],
        "completion": completion,
    }
