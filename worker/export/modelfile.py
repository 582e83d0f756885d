"""An Ollama Modelfile for an exported GGUF: `ollama create NAME -f Modelfile` beside it.

Ollama writes prompts with Go templates, not the Jinja of a Hugging Face chat template, so
a chat template is translated only when it is one of the families recognised here (by their
markers): ChatML (<|im_start|>, Qwen and many fine-tunes), Llama 3 (<|start_header_id|>)
and Lathe's own default (<|role|> headers, app.config.DEFAULT_CHAT_TEMPLATE). Each comes
with the stop strings that end a turn. For any other template the Modelfile has no
TEMPLATE: Ollama then reads the Jinja template llama.cpp's converter embedded in the GGUF
(tokenizer.chat_template) and uses it when it knows it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The turn each family opens for the reply is left open; a past assistant turn is closed.
_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range $i, $_ := .Messages }}"
    "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    "{{ if $last }}<|im_start|>assistant\n{{ end }}"
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}'
    "{{ if not $last }}<|im_end|>\n{{ end }}"
    "{{ end }}"
    "{{ end }}"
)
_LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ end }}"
    "{{ range $i, $_ := .Messages }}"
    "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
    "{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
    '{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
    "{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}"
    "{{ end }}"
    "{{ end }}"
)
# Lathe's default: "<|role|>\n" + content + "\n", an assistant turn closed by the EOS token.
_LATHE = (
    "{{ if .System }}<|system|>\n{{ .System }}\n{{ end }}"
    "{{ range $i, $_ := .Messages }}"
    "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}\n'
    "{{ if $last }}<|assistant|>\n{{ end }}"
    '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}'
    "{{ if not $last }}{EOS}\n{{ end }}"
    "{{ end }}"
    "{{ end }}"
)


@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    template: str
    stops: tuple[str, ...]


def ollama_template(
    chat_template: str | None, eos_token: str | None = None
) -> OllamaTemplate | None:
    """The Ollama form of `chat_template`, or None when it is not a family known here."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return OllamaTemplate("chatml", _CHATML, ("<|im_start|>", "<|im_end|>"))
    if "<|start_header_id|>" in chat_template:
        stops = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        return OllamaTemplate("llama3", _LLAMA3, stops)
    if "<|{{ message['role'] }}|>" in chat_template:
        eos = eos_token or ""
        stops = ("<|user|>", "<|system|>", *((eos,) if eos else ()))
        return OllamaTemplate("lathe", _LATHE.replace("{EOS}", eos), stops)
    return None


def render_modelfile(
    gguf_name: str, chat_template: str | None, eos_token: str | None = None
) -> tuple[str, OllamaTemplate | None]:
    """The Modelfile's text (FROM the GGUF beside it) and the template it carries, if any."""
    template = ollama_template(chat_template, eos_token)
    lines = [
        "# Ollama: `ollama create <model name> -f Modelfile` in this folder.",
        f"FROM ./{gguf_name}",
    ]
    if template is None:
        lines += [
            "# No TEMPLATE: Ollama reads the chat template llama.cpp embedded in the GGUF",
            "# (tokenizer.chat_template).",
        ]
    else:
        lines.append(f'TEMPLATE """{template.template}"""')
        lines += [f"PARAMETER stop {quote(stop)}" for stop in template.stops]
    return "\n".join(lines) + "\n", template


def quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
