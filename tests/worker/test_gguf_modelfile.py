"""The GGUF export's pieces that need no conversion: the Ollama Modelfile's templates, the
SentencePiece test tokenizer, and where the converter comes from (Makefile, Dockerfile.gpu,
settings)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from app.config import DEFAULT_CHAT_TEMPLATE, Settings
from worker.export.modelfile import ollama_template, render_modelfile
from worker.training.sentencepiece_tokenizer import (
    CHATML_TEMPLATE,
    sentencepiece_llama_tokenizer,
    train_sentencepiece_model,
)

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def stops(modelfile: str) -> list[str]:
    return re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)


def test_chatml_llama3_and_lathes_default_get_a_template_and_their_stops() -> None:
    chatml, _ = render_modelfile("m.gguf", CHATML_TEMPLATE)
    llama3, _ = render_modelfile("m.gguf", LLAMA3_TEMPLATE)
    lathe, _ = render_modelfile("m.gguf", DEFAULT_CHAT_TEMPLATE, eos_token="</s>")

    assert stops(chatml) == ["<|im_start|>", "<|im_end|>"]
    assert stops(llama3) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert stops(lathe) == ["<|user|>", "<|system|>", "</s>"]
    for text in (chatml, llama3, lathe):
        assert text.startswith("# Ollama") and "\nFROM ./m.gguf\n" in text
        template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S)[1]
        assert '"""' not in template
        # Go's text/template: every action that opens a block is closed.
        opened = len(re.findall(r"\{\{ (if|range) ", template))
        assert opened == len(re.findall(r"\{\{ end \}\}", template))
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}" in llama3
    assert "{{ .Content }}{{ if not $last }}</s>\n{{ end }}" in lathe


def test_an_unknown_template_leaves_it_to_the_one_in_the_gguf() -> None:
    text, template = render_modelfile("x.gguf", "{{ messages[0]['content'] }}[INST]")

    assert template is None and ollama_template(None) is None
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and not stops(text)
    assert "tokenizer.chat_template" in text
    assert text.splitlines()[1] == "FROM ./x.gguf"


def test_the_sentencepiece_tokenizer_is_the_same_everywhere_and_encodes_any_text() -> None:
    assert train_sentencepiece_model() == train_sentencepiece_model()
    tokenizer = sentencepiece_llama_tokenizer()
    text = "What is 8 + 6? Grüße aus Zürich 🙂 ∮"

    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 514
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [512, 513]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(chat)["input_ids"].count(512) == 2  # one id each, not split


def test_make_install_and_the_image_extract_the_pinned_converter() -> None:
    worker = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["worker"]
    assert "llama-cpp-python==0.3.36" in worker
    assert any(re.fullmatch(r"sentencepiece==[\d.]+", pin) for pin in worker)
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    pattern = r"""sed -n 's/\^ \*"llama-cpp-python==\\\(\[\^"\]\*\\\)"\.\*/\\1/p' pyproject\.toml"""
    paths = (
        "'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*'",
        "'*/vendor/llama.cpp/gguf-py/*'",
    )
    for text in (makefile, dockerfile):
        assert re.search(pattern, text)  # the version pyproject.toml pins, read the same way
        assert "--no-binary :all:" in text and "--strip-components=3" in text
        assert all(p in " ".join(text.replace("\\\n", " ").split()) for p in paths)
    assert re.search(r"^install: \$\(VENV\)/\.installed \$\(LLAMA_CPP_STAMP\)$", makefile, re.M)
    assert "LLAMA_CPP_DIR := $(VENV)/share/llama.cpp" in makefile
    assert "/opt/lathe/share/llama.cpp" in dockerfile and "VIRTUAL_ENV=/opt/lathe" in dockerfile
    # Where the worker looks unless LATHE_LLAMA_CPP_DIR says otherwise: this environment's.
    assert Settings().llama_cpp_dir == Path(sys.prefix) / "share" / "llama.cpp"
    assert Settings(llama_cpp_dir="/srv/llama.cpp").llama_cpp_dir == Path("/srv/llama.cpp")
