"""Tiny random encoders saved the way their hub checkpoints are, for tests: no download.

`build_tiny_bert` writes what bert-base-uncased holds: BertForPreTraining weights (the
encoder, its pooler, the masked-LM and next-sentence heads; no classifier) and a lowercasing
WordPiece tokenizer. `build_tiny_roberta` writes what roberta-base holds: RobertaForMaskedLM
weights (no pooler) and a byte-level BPE tokenizer. Loading either for classification
adds a new head, which is what Lathe's 4-bit loading must keep out of quantization.

Both vocabularies are built here from the sample news files, so every topic word of
app/data/sample_news*.jsonl is one token: a few epochs of LoRA learn the topics. A fixed
seed makes the same bytes on every machine; a model directory appears whole (written
beside it, then renamed), so concurrent callers and reruns are cheap and safe.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BertConfig,
    BertForPreTraining,
    BertForSequenceClassification,
    BertTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
)

from worker.training.tiny_model import ensure_model, seeded

DATA = Path(__file__).resolve().parents[1] / "app" / "data"
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 128
# Five times BERT's 0.02, as the tiny Llama (worker.training.tiny_model). With 0.02 the
# values mixed into [CLS] are so small beside its own embedding that its state hardly
# depends on the words (a linear probe on it: 0.42 on the validation file, chance 0.25);
# at 0.1 it does (0.70), and LoRA on query/value plus the new head reach 0.8-0.95 in 120
# steps at a learning rate of 1e-2. At 0.2 the random attention is already peaked and the
# probe falls back to chance.
INITIALIZER_RANGE = 0.1

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-base's ids 0-4
ROBERTA_VOCAB_SIZE = 1024  # bytes, specials and merges: the sample files' words whole
MAX_TOKENS = 512  # as the hub tokenizers of both say (model_max_length)


def sample_texts() -> list[str]:
    texts = []
    for path in sorted(DATA.glob("sample_news*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return texts


def wordpiece_vocab() -> dict[str, int]:
    """Specials, single characters, ##characters, and every word of the sample files."""
    characters = string.ascii_lowercase + string.digits
    words = sorted({w for text in sample_texts() for w in re.findall(r"[a-z0-9]+", text.lower())})
    tokens = [*BERT_SPECIALS, *characters, *string.punctuation]
    tokens += [f"##{c}" for c in characters] + [w for w in words if w not in tokens]
    return {token: i for i, token in enumerate(tokens)}


def bert_tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab=wordpiece_vocab(), do_lower_case=True, model_max_length=MAX_TOKENS)


def roberta_tokenizer() -> RobertaTokenizer:
    """Byte-level BPE trained on the sample texts (deterministic: ties break by pair)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sample_texts(),
        vocab_size=ROBERTA_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=ROBERTA_SPECIALS,
        show_progress=False,
    )
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=MAX_TOKENS)


def build_tiny_bert(path: Path, *, head_labels: int | None = None) -> Path:
    """A bert-base-uncased-shaped model in `path` (created unless already there).

    With `head_labels`, a BertForSequenceClassification checkpoint with a head of that many
    labels instead, as a model fine-tuned for another task is saved.
    """

    def build() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = bert_tokenizer()
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=INTERMEDIATE_SIZE,
            max_position_embeddings=MAX_TOKENS,
            initializer_range=INITIALIZER_RANGE,
            pad_token_id=tokenizer.pad_token_id,
        )
        if head_labels is None:
            return seeded(lambda: BertForPreTraining(config)), tokenizer
        config.num_labels = head_labels
        return seeded(lambda: BertForSequenceClassification(config)), tokenizer

    return ensure_model(path, build)


def build_tiny_roberta(path: Path) -> Path:
    """A roberta-base-shaped model in `path` (created unless already there)."""

    def build() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = roberta_tokenizer()
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=INTERMEDIATE_SIZE,
            # Positions start after the pad id (RoBERTa's offset): 512 usable, as roberta-base.
            max_position_embeddings=MAX_TOKENS + 2,
            type_vocab_size=1,
            initializer_range=INITIALIZER_RANGE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return seeded(lambda: RobertaForMaskedLM(config)), tokenizer

    return ensure_model(path, build)
