"""Checkpoints: written atomically, loaded with ``weights_only=True`` so a file that would run code is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .errors import NeuralpathError
from .io import atomic_path


def save(path, obj: dict):
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)


def load(path, map_location="cpu", require=("model", "config")) -> dict:
    """Load a neuralpath checkpoint (a run folder's best.pt/last.pt, or a file). Never unpickles arbitrary code."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no best.pt or last.pt in this run folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        import re

        text = str(e)
        m = re.search(r"(Unsupported global|Unsupported operand)[^\n.]*", text)
        why = (
            m.group(0).strip()
            if m
            else (
                "the file is truncated or not a torch file"
                if isinstance(e, EOFError) or "zip" in text.lower() or "magic" in text.lower()
                else "it is not a plain-tensor checkpoint"
            )
        )
        raise NeuralpathError(
            f"{path}: refused to load checkpoint: only neuralpath checkpoints (tensors, numbers, "
            f"strings and containers) are accepted, and this one is not ({why[:160]})"
        ) from None
    if not isinstance(obj, dict) or any(k not in obj for k in require):
        raise NeuralpathError(f"{path}: not a neuralpath checkpoint (no {'/'.join(map(repr, require))} entries)")
    return obj
