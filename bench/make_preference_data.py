"""Generate the DPO benchmark's preference pairs: bench/data/preference_{train,valid}.jsonl.

`python -m bench.make_preference_data` rewrites both files byte for byte the same (fixed
seed, standard library only). Each pair is a conversation of the chat benchmark's kind
(bench/make_chat_data.py: the same tasks and log-normal lengths, some multi-turn, some with
a system message) cut before its last assistant turn: the preferred output is that turn,
the non-preferred one the same answer wrapped in hedging ("Hmm, let me think. ... I am not
completely sure, though!"). One consistent style to learn, so a model trained on the pairs
can tell the two apart on held-out prompts and its validation reward accuracy rises.

app/data/sample_preference.jsonl (40 pairs of one-line sums) is too small and too uniform
to time a trainer on: this set has the chat benchmark's long-tailed lengths, so padding
every sequence to max_length costs what it costs on real data. On tiny-random-llama's
byte-level tokenizer a byte is a token, and no sequence comes near 512.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.make_chat_data import Messages, conversation, rendered_bytes

DATA = Path(__file__).resolve().parent / "data"
SEED = 20261130
N_TRAIN = 160
N_VALID = 64
# The longer sequence of a pair (prompt + the hedged reply), rendered: within the DPO
# recipe's max_length of 512, so padding to it truncates nothing.
MAX_BYTES = 500

OPENINGS = [
    "Hmm, let me think. ",
    "Well, I think maybe ",
    "Good question! I believe ",
    "Not sure, but probably ",
]
CLOSINGS = [
    " I am not completely sure, though!",
    " But please double-check that!",
    " Hope this helps, maybe!",
    " That is just my guess!",
]


def hedged(answer: str, rng: random.Random) -> str:
    return rng.choice(OPENINGS) + answer + rng.choice(CLOSINGS)


def pair(rng: random.Random) -> dict:
    """The first conversation whose hedged pair fits in MAX_BYTES, as a preference line."""
    while True:
        messages: Messages = conversation(rng)
        *prompt, last = messages
        rejected = {"role": "assistant", "content": hedged(last["content"], rng)}
        if rendered_bytes([*prompt, rejected]) <= MAX_BYTES:
            return {
                "input": {"messages": prompt},
                "preferred_output": [last],
                "non_preferred_output": [rejected],
            }


def main() -> None:
    rng = random.Random(SEED)
    DATA.mkdir(exist_ok=True)
    for name, n in {"preference_train.jsonl": N_TRAIN, "preference_valid.jsonl": N_VALID}.items():
        rows = [pair(rng) for _ in range(n)]
        with (DATA / name).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        lengths = sorted(
            rendered_bytes(r["input"]["messages"] + r["preferred_output"])
            + rendered_bytes(r["input"]["messages"] + r["non_preferred_output"])
            for r in rows
        )
        print(
            f"{name}: {n} pairs, rendered bytes of both sequences min {lengths[0]}, "
            f"median {lengths[n // 2]}, max {lengths[-1]}, total {sum(lengths)}"
        )


if __name__ == "__main__":
    main()
