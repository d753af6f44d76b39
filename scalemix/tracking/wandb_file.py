"""Read what an offline W&B run wrote to disk (``run-<id>.wandb``), without a server.

The file is W&B's LevelDB-style record log: a 7-byte header (``:W&B``, magic 0xBEE1,
version 0), then 32 KiB blocks of records, each with a 7-byte header (CRC32C, length,
type: 1 full, 2 first, 3 middle, 4 last) holding a serialised ``wandb.proto`` Record.
Used by the tests, and by ``scalemix`` users who want to check an offline run before
``wandb sync``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FILE_HEADER = 7
RECORD_HEADER = 7


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = FILE_HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_offline_run(path: str | Path) -> dict:
    """{'run', 'config', 'history', 'summary', 'exited'} of one run file (exited: complete)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": {}, "config": {}, "history": [], "summary": {}, "exited": False}
    for payload in _payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {
                "id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "group": r.run_group,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "notes": r.notes,
                "name": r.display_name,
            }
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "exit":  # written last, when the run is finished and flushed
            out["exited"] = True
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def find_run_files(root: str | Path) -> list[Path]:
    """Every offline run file under ``root`` (e.g. a run directory's ``wandb/``)."""
    return sorted(Path(root).rglob("run-*.wandb"))


def wait_until_complete(root: str | Path, timeout: float = 60.0) -> bool:
    """Wait until the offline run file under ``root`` holds its exit record.

    ``wandb.finish()`` can return while W&B's service process is still writing the file;
    anything that reads or syncs it right away must wait for this.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = find_run_files(root)
        try:
            if files and all(read_offline_run(f)["exited"] for f in files):
                return True
        except (ValueError, OSError):
            pass  # mid-write
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
