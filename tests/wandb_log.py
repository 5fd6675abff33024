"""Read the config a W&B run recorded, from its offline ``run-*.wandb`` file.

The file is a LevelDB-style log (wandb's own format: a 7-byte file header, then 32 KiB
blocks of records, each with a 7-byte header: CRC32C, length, type 1 full / 2 first /
3 middle / 4 last) holding ``wandb_internal_pb2.Record`` protobufs.  Written here from
the format so that the test does not depend on wandb's private reader.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any


def wait_for_bytes(path: Path, needles: tuple[bytes, ...], timeout: float = 60.0) -> bytes:
    """W&B's service process writes the .wandb log asynchronously: wait until it is flushed."""
    deadline = time.time() + timeout
    while True:
        content = path.read_bytes()
        if all(needle in content for needle in needles) or time.time() > deadline:
            return content
        time.sleep(0.5)


BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def _parsed(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    parsed = []
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def run_tags(path: Path) -> list[str]:
    """The tags the run was started with."""
    return [tag for r in _parsed(path) if r.WhichOneof("record_type") == "run" for tag in r.run.tags]


def run_config(path: Path) -> dict[str, Any]:
    """Config as the W&B dashboard shows it: every top-level key, last update wins."""
    config: dict[str, Any] = {}
    for record in _parsed(path):
        kind = record.WhichOneof("record_type")
        if kind not in ("run", "config"):
            continue
        update = record.run.config if kind == "run" else record.config
        for item in update.update:
            key = item.key or ".".join(item.nested_key)
            config[key] = json.loads(item.value_json)
    return {k: v for k, v in config.items() if not k.startswith("_")}
