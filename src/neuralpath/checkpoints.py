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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeuralpathError(f"{path}: refused to load checkpoint (not a plain-tensor neuralpath checkpoint: "
                              f"{first[:200]})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in require):
        raise NeuralpathError(f"{path}: not a neuralpath checkpoint (no {'/'.join(map(repr, require))} entries)")
    return obj
