"""Safetensors shards written as the tensors arrive, and the index that names them, in the
layout save_pretrained writes: one model.safetensors when everything fits, else
model-0000k-of-0000n.safetensors with model.safetensors.index.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Holds at most one shard's tensors: a shard is written once the next tensor would
    overflow it (a tensor bigger than a shard gets one of its own, as in save_pretrained)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # temporary file, its tensors
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        # contiguous: safetensors writes a tensor's storage as it lies.
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards for their count and write the index; returns the file names."""
        self.flush()
        count = len(self.written)
        if count == 0:
            raise ValueError("no tensors to write")
        if count == 1:
            self.written[0][0].rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        names = []
        for number, (path, tensors) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(tensors, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
