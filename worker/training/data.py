"""Training data: JSONL lines into token ids with loss masks, and the collators that batch them.

Loss is taken only on what the model should learn to write: assistant turns in chat
(their end-of-turn marker included), the completion in prompt/completion, everything in
plain text; with `train_on_inputs` on the prompt side too. Everything else is labelled
-100, the index PyTorch's cross-entropy ignores. A classification example is its text and
one class index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from app.domain.datasets import DatasetFormat
from worker.training.spec import TrainingDataError

IGNORE_INDEX = -100
# Line numbers of refused examples named in an error; more would only bury the message.
MAX_LINES_NAMED = 10

Example = dict  # input_ids, attention_mask, labels (a list, or one class index)


def load_tokenizer(model_path: Path, chat_template: str | None) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with the deployment's chat template when one is set."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without one; pad positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) of an already validated file; blank lines are skipped."""
    # Lines end at "\n" only, as the upload validator split them: a "\r" inside a line is
    # JSON whitespace there, and line numbers must match its.
    with open(path, encoding="utf-8", newline="\n") as f:
        return [(n, json.loads(line)) for n, line in enumerate(f, start=1) if line.strip()]


class _Builder:
    """Appends text pieces as tokens, each either trained on or masked."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool) -> None:
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
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
            self.add_ids(ids, train=train or self.train_on_inputs)

    def add_bos(self) -> None:
        # Never a target: nothing comes before it to predict it from.
        if self.tokenizer.bos_token_id is not None:
            self.add_ids([self.tokenizer.bos_token_id], train=False)

    def add_eos(self) -> None:
        self.add_ids([self.tokenizer.eos_token_id], train=True)

    def build(self) -> Example:
        return {
            "input_ids": self.input_ids,
            "attention_mask": [1] * len(self.input_ids),
            "labels": self.labels,
        }


def tokenize_chat(
    record: dict, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool = False
) -> Example:
    """Render through the chat template, training on each assistant turn.

    The template is rendered prefix by prefix: the text before an assistant turn is the
    conversation so far with the generation prompt (exactly what inference will feed the
    model), and the turn is what the template adds for that message, end marker included.
    This works for any template that renders a conversation as the concatenation of its
    turns, without needing `{% generation %}` markers in it.
    """
    messages = record["messages"]
    builder = _Builder(tokenizer, train_on_inputs)
    rendered = ""

    def extend(text: str, *, train: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise TrainingDataError(
                "unsupported_chat_template",
                "the chat template does not render a conversation as the sum of its turns; "
                "cannot tell which tokens are the assistant's",
            )
        builder.add_text(text[len(rendered) :], train=train)
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(chat_prompt(messages[:i], tokenizer), train=False)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        extend(turn, train=message["role"] == "assistant")
    return builder.build()


def chat_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model is given to write the next assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompt_completion(
    record: dict, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool = False
) -> Example:
    builder = _Builder(tokenizer, train_on_inputs)
    builder.add_bos()
    builder.add_text(record["prompt"], train=False)
    builder.add_text(record["completion"], train=True)
    builder.add_eos()  # so the model learns where a completion ends
    return builder.build()


def tokenize_text(
    record: dict, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool = False
) -> Example:
    builder = _Builder(tokenizer, train_on_inputs)
    builder.add_bos()
    builder.add_text(record["text"], train=True)
    builder.add_eos()
    return builder.build()


TOKENIZERS: dict[DatasetFormat, Callable[..., Example]] = {
    DatasetFormat.CHAT: tokenize_chat,
    DatasetFormat.PROMPT_COMPLETION: tokenize_prompt_completion,
    DatasetFormat.TEXT: tokenize_text,
}


def class_names(path: Path) -> list[str]:
    """The classes of a classification file, sorted: index i is class i of the model."""
    classes = sorted({str(record["label"]) for _, record in read_jsonl(path)})
    if len(classes) < 2:
        raise TrainingDataError(
            "too_few_classes",
            f"{path.name}: a classifier needs at least two labels; every example is {classes[0]!r}"
            if classes
            else f"{path.name}: no labels",
        )
    return classes


def check_parent_classes(parent_adapter: Path, classes: list[str]) -> None:
    """A classifier trained on from another must keep its classes, in order: the parent's
    head has one output per class of its own file, and output i would otherwise silently
    mean another class (or, with another count, not load at all)."""
    saved = parent_adapter / "classes.json"
    parent_classes = json.loads(saved.read_text()) if saved.is_file() else None
    if parent_classes != classes:
        raise TrainingDataError(
            "classes_mismatch",
            f"the parent model classifies into {parent_classes!r} but this training file's "
            f"labels are {classes!r}: a classifier trained on from another must use the same "
            "labels; train from the base model for a new set of classes",
        )


@dataclass
class TokenCounts:
    """What one file costs and what was cut: reported on the job before training starts."""

    examples: int = 0  # kept, after dropping
    tokens: int = 0  # input tokens of one epoch, after truncation
    trained_tokens: int = 0  # of those, the ones with a loss (classification: 0)
    truncated: int = 0  # examples cut to max_seq_length
    dropped: int = 0  # examples with nothing left to train on after the cut
    longest: int = 0  # the longest example before truncation, in tokens

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenizedFile:
    examples: list[Example]
    counts: TokenCounts


def load_examples(
    path: Path,
    data_format: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    train_on_inputs: bool = False,
    truncation: str = "truncate",
    classes: list[str] | None = None,
) -> TokenizedFile:
    """Tokenized examples of one JSONL file, with their token counts.

    An example longer than max_seq_length is cut to it ("truncate") or refuses the whole
    file with the offending line numbers ("refuse"). A cut example whose trained tokens
    were all cut off is dropped: it would cost a forward pass and teach nothing.
    Classification files need `classes` (index = class id); an unknown label is refused.
    """
    fmt = DatasetFormat(data_format)
    counts = TokenCounts()
    examples: list[Example] = []
    too_long: list[int] = []
    for line, record in read_jsonl(path):
        if fmt == DatasetFormat.CLASSIFICATION:
            example = _classification_example(record, tokenizer, classes or [], path, line)
        else:
            example = TOKENIZERS[fmt](record, tokenizer, train_on_inputs)
        length = len(example["input_ids"])
        counts.longest = max(counts.longest, length)
        if length > max_seq_length:
            too_long.append(line)
            counts.truncated += 1
            example = {
                key: value[:max_seq_length] if isinstance(value, list) else value
                for key, value in example.items()
            }
            if isinstance(example["labels"], list) and all(
                label == IGNORE_INDEX for label in example["labels"]
            ):
                counts.dropped += 1
                continue
        examples.append(example)
        counts.examples += 1
        counts.tokens += len(example["input_ids"])
        if isinstance(example["labels"], list):
            counts.trained_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
    if too_long and truncation == "refuse":
        raise too_long_error(path, too_long, max_seq_length, counts.longest)
    if not examples:
        raise TrainingDataError(
            "no_trainable_examples",
            f"{path.name}: no example has a token to train on within max_seq_length "
            f"({max_seq_length})",
        )
    return TokenizedFile(examples, counts)


def too_long_error(
    path: Path, lines: list[int], max_seq_length: int, longest: int
) -> TrainingDataError:
    """Refusing a file (training.truncation "refuse") whose `lines` exceed max_seq_length."""
    named = ", ".join(map(str, lines[:MAX_LINES_NAMED]))
    more = f" and {len(lines) - MAX_LINES_NAMED} more" if len(lines) > MAX_LINES_NAMED else ""
    return TrainingDataError(
        "examples_too_long",
        f"{path.name}: {len(lines)} examples are longer than max_seq_length "
        f"({max_seq_length} tokens; the longest has {longest}): lines {named}{more}. "
        "Raise max_seq_length, shorten them, or set training.truncation to 'truncate'",
    )


def _classification_example(
    record: dict, tokenizer: PreTrainedTokenizerBase, classes: list[str], path: Path, line: int
) -> Example:
    label = str(record["label"])
    if label not in classes:
        raise TrainingDataError(
            "unknown_label",
            f"{path.name}: line {line}: label {label!r} does not occur in the training file "
            f"(classes: {', '.join(classes[:20])})",
        )
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": classes.index(label)}


def micro_batch_size(batch_size: int, typical_tokens: float, budget_tokens: int) -> int:
    """The largest divisor of batch_size whose packed row (micro examples of the typical
    length) stays within budget_tokens; at least 1. Divisors only, so that micro-batches
    times accumulation steps is exactly the batch."""
    fitting = [
        d
        for d in range(1, batch_size + 1)
        if batch_size % d == 0 and d * typical_tokens <= budget_tokens
    ]
    return max(fitting, default=1)


def typical_length(examples: list[Example]) -> int:
    """The 90th percentile of the examples' lengths: what a micro-batch is sized by, so that
    rows of long examples (a long-tailed chat set's) rarely run far past the budget."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    return lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]


def make_collator(
    tokenizer: PreTrainedTokenizerBase, *, packing: bool, classification: bool, flash: bool
):
    """How examples become a batch.

    Packing (padding-free): the batch's examples are concatenated into one row with no pad
    token at all; position ids restart at 0 for each example, from which the attention
    masks of SDPA and eager attention are built block-diagonal (transformers' packed
    sequence detection), so no example attends to another; flash-attention gets the
    sequence boundaries directly. The first label of each example is -100, so no example's
    first token is predicted from the one before it.
    Without packing each batch is padded to its longest example (padded labels ignored).
    Classification is always padded: the model reads each row's last real token.
    """
    if classification:
        return DataCollatorWithPadding(tokenizer)
    if packing:
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=flash)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
