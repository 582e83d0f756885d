"""Training data: JSONL lines into token ids with loss masks, and the collator that pads them.

Loss is taken only on what the model should learn to write: assistant turns in chat
(their end-of-turn marker included), the completion in prompt/completion, everything in
plain text. Everything else is labelled -100, the index PyTorch's cross-entropy ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from app.domain.datasets import DatasetFormat

IGNORE_INDEX = -100

Example = dict[str, list[int]]  # input_ids, attention_mask, labels; one unpadded sequence


def load_tokenizer(model_path: Path, chat_template: str | None) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with the deployment's chat template when one is set."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without one; pad positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_jsonl(path: Path) -> list[dict]:
    """The records of an already validated file; blank lines carry no example."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _Builder:
    """Appends text pieces as tokens, each either trained on or masked."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.input_ids: list[int] = []
        self.labels: list[int] = []

    def add_ids(self, ids: list[int], *, train: bool) -> None:
        self.input_ids += ids
        self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def add_text(self, text: str, *, train: bool) -> None:
        # Pieces are tokenized one by one so the boundary between prompt and answer is exact.
        # A merge-based tokenizer might have merged across it; the model sees the same
        # split at inference, where the prompt is tokenized alone.
        if text:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.add_ids(ids, train=train)

    def add_bos(self) -> None:
        if self.tokenizer.bos_token_id is not None:
            self.add_ids([self.tokenizer.bos_token_id], train=False)

    def add_eos(self) -> None:
        self.add_ids([self.tokenizer.eos_token_id], train=True)

    def build(self, max_seq_length: int) -> Example:
        input_ids = self.input_ids[:max_seq_length]
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": self.labels[:max_seq_length],
        }


def tokenize_chat(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Example:
    """Render through the chat template, training on each assistant turn.

    The template is rendered prefix by prefix: the text before an assistant turn is the
    conversation so far with the generation prompt (exactly what inference will feed the
    model), and the turn is what the template adds for that message, end marker included.
    This works for any template that renders a conversation as the concatenation of its
    turns, without needing `{% generation %}` markers in it.
    """
    messages = record["messages"]
    builder = _Builder(tokenizer)
    rendered = ""

    def extend(text: str, *, train: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError(
                "the chat template does not render a conversation as the sum of its turns; "
                "cannot tell which tokens are the assistant's"
            )
        builder.add_text(text[len(rendered) :], train=train)
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            extend(prompt, train=False)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        extend(turn, train=message["role"] == "assistant")
    return builder.build(max_seq_length)


def tokenize_prompt_completion(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> Example:
    builder = _Builder(tokenizer)
    builder.add_bos()
    builder.add_text(record["prompt"], train=False)
    builder.add_text(record["completion"], train=True)
    builder.add_eos()  # so the model learns where a completion ends
    return builder.build(max_seq_length)


def tokenize_text(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Example:
    builder = _Builder(tokenizer)
    builder.add_bos()
    builder.add_text(record["text"], train=True)
    builder.add_eos()
    return builder.build(max_seq_length)


TOKENIZERS = {
    DatasetFormat.CHAT: tokenize_chat,
    DatasetFormat.PROMPT_COMPLETION: tokenize_prompt_completion,
    DatasetFormat.TEXT: tokenize_text,
}


def load_examples(
    path: Path, data_format: str, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> list[Example]:
    """Tokenized examples of one JSONL file.

    An example whose trained tokens were all cut off by max_seq_length is dropped: it
    would cost a forward pass and teach nothing (and a batch of only such examples has no
    loss at all).
    """
    tokenize = TOKENIZERS[DatasetFormat(data_format)]
    examples = [tokenize(record, tokenizer, max_seq_length) for record in read_jsonl(path)]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise ValueError(
            f"{path.name}: no example has a token to train on within max_seq_length "
            f"({max_seq_length})"
        )
    return examples


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest sequence; padded label positions are ignored."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
