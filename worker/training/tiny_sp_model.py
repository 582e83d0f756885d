"""The tiny random Llama of worker.training.tiny_model with a SentencePiece vocabulary
(worker.training.sentencepiece_tokenizer) instead of ByT5's bytes: a model llama.cpp's
GGUF converter takes, for the GGUF export's tests and benchmarks. The demo keeps its own.

Same shapes, same seed, same one-shot directory write as tiny-random-llama.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from worker.training import tiny_model
from worker.training.sentencepiece_tokenizer import sentencepiece_llama_tokenizer
from worker.training.tiny_model import ensure_model, seeded

TINY_SP_LLAMA = "tiny-random-llama-sp"


def build_tiny_llama_sp_model() -> tuple[LlamaForCausalLM, LlamaTokenizer]:
    tokenizer = sentencepiece_llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 512 pieces + the two ChatML tokens
        hidden_size=tiny_model.HIDDEN_SIZE,
        intermediate_size=tiny_model.INTERMEDIATE_SIZE,
        num_hidden_layers=tiny_model.NUM_LAYERS,
        num_attention_heads=tiny_model.NUM_HEADS,
        num_key_value_heads=tiny_model.NUM_KV_HEADS,
        max_position_embeddings=tiny_model.MAX_POSITIONS,
        initializer_range=tiny_model.INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return seeded(lambda: LlamaForCausalLM(config)), tokenizer


def build_tiny_llama_sp(path: Path) -> Path:
    """Generate the model into `path` unless it is already there; returns `path`."""
    return ensure_model(path, build_tiny_llama_sp_model)
