"""Preference pairs (OpenAI's DPO format) as the token ids TRL's DPOTrainer trains on.

A line {"input": {"messages"}, "preferred_output": [reply], "non_preferred_output": [reply]}
becomes TRL's tokenized preference row: prompt_ids (the conversation with the generation
prompt, exactly what inference feeds the model), chosen_ids and rejected_ids (what the chat
template adds for each reply, its end-of-turn marker included). The boundary is found as the
supervised path finds an assistant turn (worker.training.data.tokenize_chat): the reply is
the rendered conversation past the rendered prompt, so a DPO job trains on the same tokens
for a reply as an SFT job on the same base did.

Tokenizing here rather than in DPOTrainer (which would render the same template) lets the
job count and cut its examples, and refuse a file, before the base model is loaded, with the
same rules and report as the supervised path: a pair is cut to max_seq_length per sequence
(prompt + reply; TRL's "keep_start"), and dropped when the prompt alone leaves no room for
either reply.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from worker.training.data import (
    TokenCounts,
    TokenizedFile,
    chat_prompt,
    read_jsonl,
    too_long_error,
)
from worker.training.spec import TrainingDataError


def conversation(messages: list[dict]) -> list[dict]:
    """Messages as the chat template renders them: role and content (what the upload
    validator checked; other keys would only give Arrow rows of different shapes)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_pair(record: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    """prompt_ids, chosen_ids and rejected_ids of one preference line, uncut."""
    messages = conversation(record["input"]["messages"])
    prompt = chat_prompt(messages, tokenizer)

    def reply_ids(output: list[dict]) -> list[int]:
        rendered = tokenizer.apply_chat_template(messages + conversation(output), tokenize=False)
        if not rendered.startswith(prompt):
            raise TrainingDataError(
                "unsupported_chat_template",
                "the chat template does not render a conversation as the sum of its turns; "
                "cannot tell which tokens are the assistant's",
            )
        return tokenizer(rendered[len(prompt) :], add_special_tokens=False)["input_ids"]

    return {
        "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
        "chosen_ids": reply_ids(record["preferred_output"]),
        "rejected_ids": reply_ids(record["non_preferred_output"]),
    }


def load_preferences(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    truncation: str = "truncate",
) -> TokenizedFile:
    """Tokenized pairs of one preference file (each with its line), and their token counts.

    Counted per pair, both sequences (prompt + chosen, prompt + rejected: the model reads
    both): `tokens` after the cut, `trained_tokens` the replies' tokens within it,
    `truncated` the pairs with a sequence past max_seq_length, `dropped` those whose prompt
    alone fills it, `longest` the longest sequence before the cut.
    """
    counts = TokenCounts()
    pairs: list[dict] = []
    too_long: list[int] = []
    for line, record in read_jsonl(path):
        pair = tokenize_pair(record, tokenizer)
        prompt = len(pair["prompt_ids"])
        longest = prompt + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        counts.longest = max(counts.longest, longest)
        if longest > max_seq_length:
            too_long.append(line)
            counts.truncated += 1
            if prompt >= max_seq_length:
                counts.dropped += 1
                continue
            room = max_seq_length - prompt
            pair["chosen_ids"] = pair["chosen_ids"][:room]
            pair["rejected_ids"] = pair["rejected_ids"][:room]
        pairs.append({**pair, "line": line})
        counts.examples += 1
        replies = len(pair["chosen_ids"]) + len(pair["rejected_ids"])
        counts.tokens += 2 * prompt + replies
        counts.trained_tokens += replies
    if too_long and truncation == "refuse":
        raise too_long_error(path, too_long, max_seq_length, counts.longest)
    if not pairs:
        raise TrainingDataError(
            "no_trainable_examples",
            f"{path.name}: no pair leaves room for a reply within max_seq_length "
            f"({max_seq_length}): every prompt fills it",
        )
    return TokenizedFile(pairs, counts)


def typical_pair_length(pairs: list[dict]) -> int:
    """The 90th percentile of a pair's longer sequence: what a micro-batch is sized by."""
    lengths = sorted(
        len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs
    )
    return lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
