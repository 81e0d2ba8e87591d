"""Atomic file writes: everything neuralpath writes goes to a temporary name in the same folder, then is renamed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import NeuralpathError


def hash_tensor(h, t):
    """Feed a tensor's dtype, shape and bytes to the digest ``h`` (a hashlib object), without copying them."""
    import torch

    t = torch.as_tensor(t).detach().cpu().contiguous()
    h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed. The file
    gets the permissions a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {path.parent} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str):
    write_bytes(path, text.encode())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path, record: dict):
    """Append one JSON line. A single write() of a line opened with O_APPEND is atomic for our sizes on POSIX,
    so concurrent writers never interleave within a record; readers skip a torn last line (see read_jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path, strict: bool = False):
    """Records of a JSON-lines file; a torn (unterminated or unparsable) line is skipped. ``strict=True`` (files a
    user hands to a report): only a torn last line is skipped; an unparsable line elsewhere, or a line that is not
    a JSON object, is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    text = path.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            torn = i == len(lines) and not text.endswith("\n")
            if strict and not torn and line.strip():
                raise NeuralpathError(f"{path}:{i}: not a JSON record ({e.msg}); fix or delete that line") from None
            continue
        if strict and not isinstance(rec, dict):
            raise NeuralpathError(f"{path}:{i}: a record must be a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


def save_npy(path, array):
    import numpy as np

    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)
