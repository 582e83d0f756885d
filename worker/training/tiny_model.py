"""The tiny random-weight Llama that tests, CI and the demo fine-tune instead of a real model.

It is generated on the machine rather than downloaded: nothing may reach a model hub, and a
byte-level tokenizer (ByT5's: 256 bytes + 3 specials + 125 sentinels = 384 ids) needs no
vocabulary file. A fixed seed makes every machine generate the same bytes, so an adapter
trained on one machine fits the base model on another.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SEED = 0

# Small enough that a few dozen QLoRA steps take seconds on a laptop CPU; 4 heads over 2 KV
# heads keeps grouped-query attention on the code path, as in real Llama models.
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 1024
# Five times the usual 0.02. Adapters sit in attention, in front of a frozen random lm_head;
# with 0.02 its logits span about ±1, so no adapter can make a token likely and the loss
# barely moves. At 0.1 the demo's loss falls visibly within a few epochs.
INITIALIZER_RANGE = 0.1

# Seeding is process-global: two threads generating at once would interleave draws from
# one random stream and each get different weights.
_generating = threading.Lock()


def is_complete(path: Path) -> bool:
    """A model directory only ever appears whole (see below), so its weights file is proof."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def build_tiny_random_llama(chat_template: str) -> tuple[LlamaForCausalLM, ByT5Tokenizer]:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # ByT5 has no beginning-of-sequence token
        tie_word_embeddings=False,
    )
    return seeded(lambda: LlamaForCausalLM(config)), tokenizer


def seeded(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """A model built from the fixed seed: the same weights on every machine."""
    # fork_rng: seeding here must not change the random stream of whoever called us.
    with _generating, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def ensure_model(
    path: Path, build: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
) -> Path:
    """Write the model `build` makes into `path` unless it is already there; returns `path`.

    Two processes (the API's demo and a worker, say) may race here: each writes into its
    own temporary directory beside `path` and renames it into place, which is atomic, so
    the loser finds a complete model and throws its copy away.
    """
    path = Path(path)
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(staging)  # safetensors: transformers 5 writes nothing else
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, path)
        except OSError:
            # Someone else's rename won (the target exists and is not empty).
            if not is_complete(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_tiny_random_llama(path: Path, chat_template: str) -> Path:
    """Generate the tiny model into `path` unless it is already there; returns `path`."""
    return ensure_model(path, lambda: build_tiny_random_llama(chat_template))
