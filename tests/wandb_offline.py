"""Reads back what an offline W&B run wrote: its run-<id>.wandb file, W&B's own record log.

wandb 0.31 writes an offline run as <dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb
(files/ holds no history or summary JSON until `wandb sync`), and ships no Python reader
for it (wandb-core, in Go, writes and reads it). The format is small and stable: a 7-byte
header (":W&B", a 2-byte magic, a version byte), then LevelDB's log format (32 KiB
blocks of records, each a 7-byte header: CRC, length, type: full, or first, middle and
last fragments), each record a protobuf wandb.proto.wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    display_name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one per logged step
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # name, type, files
    exit_code: int | None = None


def offline_run_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))


def read_finished_run(directory: Path, deadline_s: float = 30.0) -> OfflineRun:
    """The one offline run under `directory`, once its exit record is on disk: run.finish()
    returns before wandb-core has flushed the file's last block (it buffers 32 KiB)."""
    deadline = time.monotonic() + deadline_s
    while True:
        paths = offline_run_files(directory)
        if len(paths) > 1:
            raise AssertionError(f"more than one offline run: {paths}")
        run = read_offline_run(paths[0]) if paths else None
        if run is not None and run.exit_code is not None:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished offline run under {directory}: {paths}")
        time.sleep(0.1)


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if pos + length > len(data):  # still being written
            break
        if kind == 0:  # zeroes: the rest of a block never written
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_offline_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.project = record.run.project
            run.display_name = record.run.display_name
            run.tags = list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "artifact":
            files = [entry.path for entry in record.artifact.manifest.contents]
            run.artifacts.append(
                {"name": record.artifact.name, "type": record.artifact.type, "files": files}
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _items(items: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}
