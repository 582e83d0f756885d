"""The GGUF export's child process (worker.export.gguf starts it; nothing else should).

    python gguf_child.py convert LLAMA_CPP_DIR MODEL_DIR OUTFILE OUTTYPE SUMMARY [NAME]
    python gguf_child.py quantize LLAMA_CPP_DIR INFILE OUTFILE FTYPE SUMMARY

`convert` runs llama.cpp's convert_hf_to_gguf.py (from LLAMA_CPP_DIR, see app.config's
llama_cpp_dir) as if started as a script; `quantize` runs llama.cpp's quantizer through
llama-cpp-python's C API (llama_model_quantize). Either then writes SUMMARY, a JSON object
with the output's tensor count and tensor types, read with llama.cpp's gguf package.

It is run by path, not as worker.export.gguf_child: importing the worker.export package
would load the training stack (seconds) that neither step needs. First thing, it arms
app.lifetime's die_with_parent: it ends when the worker that started it does.
"""

from __future__ import annotations

import sys

# Run by path, this file's folder (worker/export) comes first on sys.path; its gguf.py
# would shadow llama.cpp's gguf package.
if sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import ctypes  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from app.lifetime import die_with_parent  # noqa: E402

# llama.cpp's names for the quantized file types this step makes (llama.h's llama_ftype).
QUANTIZE_FTYPES = {"q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def convert(llama_cpp: Path, model_dir: str, outfile: str, outtype: str, name: list[str]) -> None:
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.path.insert(0, str(llama_cpp))  # its conversion package; it adds gguf-py itself
    sys.argv = [str(script), model_dir, "--outfile", outfile, "--outtype", outtype]
    sys.argv += ["--model-name", *name] if name else []  # GGUF's general.name
    runpy.run_path(str(script), run_name="__main__")


def quantize(infile: str, outfile: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZE_FTYPES[ftype]
    params.nthread = 0  # all cores
    status = llama_cpp.llama_model_quantize(infile.encode(), outfile.encode(), ctypes.byref(params))
    if status != 0:
        sys.exit(f"llama_model_quantize failed ({status})")


def summarize(llama_cpp: Path, gguf_file: str, summary: str) -> None:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    Path(summary).write_text(json.dumps({"tensors": len(reader.tensors), "types": types}))


def main(argv: list[str]) -> None:
    die_with_parent()
    step, llama_cpp, source, outfile, kind, summary, *name = argv
    if step == "convert":
        convert(Path(llama_cpp), source, outfile, kind, name)
    elif step == "quantize":
        quantize(source, outfile, kind)
    else:
        sys.exit(f"unknown step {step!r}")
    summarize(Path(llama_cpp), outfile, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
