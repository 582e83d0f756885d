"""A small SentencePiece tokenizer, trained on this machine, saved as a Llama tokenizer.

The demo's tiny model speaks ByT5's byte vocabulary, which llama.cpp's GGUF converter does
not know. Real Llama and Mistral checkpoints ship a SentencePiece BPE model with byte
fallback; this is one of those in miniature: trained on the sample files bundled in
app/data (every string of every record), 512 pieces of which 256 are the bytes, so any text
encodes. ChatML's <|im_start|> and <|im_end|> are added as special tokens (ids 512 and 513)
with ChatML's chat template, as Qwen's tokenizers carry them.

Training is single-threaded and the corpus is read in a fixed order, so every machine
builds the same pieces with the same ids.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sentencepiece
from transformers import LlamaTokenizer

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
SENTENCEPIECE_FILE = "tokenizer.model"
VOCAB_SIZE = 512  # 3 specials (<unk> <s> </s>), 256 bytes, 253 merged pieces
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_texts() -> Iterator[str]:
    """Every string in the bundled sample files, file by file in name order."""

    def strings(value) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield from strings(json.loads(line))


def train_sentencepiece_model(vocab_size: int = VOCAB_SIZE) -> bytes:
    """The serialized SentencePiece model (what a checkpoint's tokenizer.model holds)."""
    model = tempfile.SpooledTemporaryFile()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sample_texts(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # a character never seen becomes its UTF-8 bytes, not <unk>
        character_coverage=1.0,
        split_digits=True,  # as Llama's: numbers are digit by digit
        # No space put before each text: llama.cpp's tokenizer would put it before every
        # piece of text after a special token (<|im_start|>user), transformers' only before
        # the first, and chat prompts would be split differently.
        add_dummy_prefix=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # Llama's has none
        normalization_rule_name="identity",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    model.seek(0)
    return model.read()


def sentencepiece_llama_tokenizer(chat_template: str = CHATML_TEMPLATE) -> LlamaTokenizer:
    """The trained model as a Llama tokenizer: <s> before each text, ChatML specials added.

    Its save_pretrained writes tokenizer.model beside tokenizer.json, as hub checkpoints
    carry both: transformers 5 writes only its own tokenizer.json, and llama.cpp's
    converter takes the pieces' merge scores from tokenizer.model (from tokenizer.json
    alone it gives every piece the same score, and llama.cpp then splits words otherwise).
    """
    proto = train_sentencepiece_model()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / SENTENCEPIECE_FILE).write_bytes(proto)
        # transformers converts tokenizer.model into its own (tokenizer.json) form here.
        tokenizer = LlamaTokenizer.from_pretrained(
            folder, add_bos_token=True, add_prefix_space=False
        )
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = chat_template
    save_pretrained = tokenizer.save_pretrained

    def save_with_sentencepiece_model(directory, *args, **kwargs):
        files = save_pretrained(directory, *args, **kwargs)
        (Path(directory) / SENTENCEPIECE_FILE).write_bytes(proto)
        return (*files, str(Path(directory) / SENTENCEPIECE_FILE))

    tokenizer.save_pretrained = save_with_sentencepiece_model
    return tokenizer
