"""Data sets as tensors: ``x, y = load(name, split)`` gives float32 images in [0, 1], (n, C, H, W), int64 labels,
in the original order (CIFAR-10's JPEG copy: by class then file name, since the copy lost the original order).

The first load of a data set decodes and verifies the source files and writes a uint8 cache
(``<root>/cache/*.npy``); later loads memory-map it, so a second MNIST load takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack, overload

import numpy as np
import torch

from ..errors import NeuralpathError, check_choice
from ..io import save_npy, write_text
from . import formats, sources, trees
from .sources import default_root

NAMES = ("mnist", "fashion-mnist", "cifar10", "synthetic", "sd-i", "sd-ii", "sd-iii")
SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # (C, H, W) of each image
SPLITS = ("train", "test")
CLASS_COUNTS = {
    ("mnist", "train"): [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    ("mnist", "test"): [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


def _check(name, split):
    check_choice("dataset", name, NAMES)
    check_choice("split", split, SPLITS)


def fetch(name: str, root=None, mirrors=None, progress: bool = True, log=print) -> dict:
    """Put a verified copy of ``name`` into ``root`` (see :mod:`neuralpath.datasets.sources`). Idempotent."""
    check_choice("dataset", name, NAMES)
    root = Path(root) if root else default_root()
    if root.exists() and not root.is_dir():
        raise NeuralpathError(f"--root {root} is a file; give a folder for the data (it is created if missing)")
    if name == "synthetic" or name in trees.SETS:
        return {name: "generated on the fly, nothing to fetch"}
    if name == "cifar10":
        return sources.fetch_cifar(root, url=(mirrors[0] if mirrors else None), progress=progress, log=log)
    return sources.fetch_idx(name, root, mirrors=mirrors, progress=progress, log=log)


def source_label(name: str, root=None) -> str:
    """Human label of the copy in use, e.g. 'CIFAR-10 (JPEG copy)'."""
    if name == "cifar10":
        kind, _ = sources.cifar_location(Path(root) if root else default_root())
        return "CIFAR-10 (JPEG copy)" if kind == "jpeg" else "CIFAR-10"
    return {
        "mnist": "MNIST",
        "fashion-mnist": "Fashion-MNIST",
        "synthetic": "synthetic",
        "sd-i": "SD-I (generated)",
        "sd-ii": "SD-II (generated)",
        "sd-iii": "SD-III (generated)",
    }[name]


def _source_files(name, split, root):
    if name in sources.IDX_SETS:
        files = []
        for fn in sources.IDX_SETS[name]["files"][split]:
            p = sources.find_raw(name, root, fn)
            if p is None:
                raise FileNotFoundError(
                    f"{name} {split}: {fn} not found in {sources.raw_dir(name, root)}; "
                    f"run `neuralpath data fetch {name} --root {root}`"
                )
            files.append(p)
        return files
    kind, where = sources.cifar_location(root)
    if kind is None:
        raise FileNotFoundError(f"cifar10: no copy in {root}; run `neuralpath data fetch cifar10 --root {root}`")
    assert where is not None
    if kind == "official":
        return [
            where / (f"data_batch_{i}" if split == "train" else "test_batch")
            for i in range(1, 6 if split == "train" else 2)
        ]
    return [where]


def _decode(name, split, root, files):
    if name in sources.IDX_SETS:
        res = {r.name: r for r in sources.IDX_SETS[name]["resources"]}
        for p in files:
            sources.verify_file(p, res[p.name.removesuffix(".gz")])
        return formats.read_idx_pair(*files)
    kind, where = sources.cifar_location(root)
    if kind == "official":
        return formats.read_cifar_batches(where, split)
    import sys

    x, y, classes = formats.read_image_folder(where, split, channels=3, progress=sys.stderr.isatty())
    return x, y


def _digest(x, y) -> str:
    """sha256 of a decoded data set's content (images then labels): one pass, written beside the cache."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()


def _cache_dir(root: Path) -> Path:
    """``root/cache`` when the data root is writable, else a per-user cache (a read-only shared data folder)."""
    d = root / "cache"
    if (d.is_dir() and os.access(d, os.W_OK)) or (not d.exists() and os.access(root, os.W_OK)):
        return d
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuralpath" / "derived"
    return base / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


def _load_uint8(name, split, root):
    """The decoded uint8 images and labels of a split, from a verified cache or decoded (and cached) from the
    verified source files. The cache carries the sha256 of its content, checked at every load: a cache whose
    header is intact but whose content changed is rebuilt from the sources."""
    root = Path(root)
    files = _source_files(name, split, root)
    key = hashlib.sha1(json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    stem = _cache_dir(root) / f"{name}-{split}-{key.hexdigest()[:12]}"
    xp, yp, sp = (Path(str(stem) + s) for s in ("-x.npy", "-y.npy", ".sha256"))
    if xp.exists() and yp.exists() and sp.exists():
        try:
            x, y = np.load(xp, mmap_mode="r"), np.load(yp)
            if _digest(x, y) == sp.read_text().strip():
                return x, y
        except (ValueError, OSError):
            pass
        import sys

        print(
            f"note: the decoded {name} {split} cache in {stem.parent} does not match its checksum; rebuilding it "
            "from the verified source files",
            file=sys.stderr,
        )
    x, y = _decode(name, split, root, files)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    save_npy(yp, y)
    save_npy(xp, x)
    write_text(sp, _digest(x, y) + "\n")
    return np.load(xp, mmap_mode="r"), np.load(yp)


_TREES = {}


def _tree_split(name, split):
    if name not in _TREES:
        d, n = trees.SETS[name]
        x, y, _ = trees.generate(d, n)
        tr, te = trees.split(y)
        _TREES[name] = {"train": (x[tr], y[tr]), "test": (x[te], y[te])}
    return _TREES[name][split]


def split_size(name: str, split: str, root=None, **synthetic_kwargs) -> int:
    """Number of examples in a split (decodes and caches it on first use)."""
    _check(name, split)
    if name in trees.SETS:
        return len(_tree_split(name, split)[1])
    if name == "synthetic":
        return len(synthetic(split, **synthetic_kwargs)[1])
    return len(_load_uint8(name, split, Path(root) if root else default_root())[1])


def check_limit(flag: str, limit, name: str, split: str, root=None, **synthetic_kwargs):
    """A requested subset size must be a positive integer no larger than the split: never clipped silently."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise NeuralpathError(f"{flag} {limit!r} must be a positive integer")
    n = split_size(name, split, root, **synthetic_kwargs)
    if limit > n:
        raise NeuralpathError(
            f"{flag} {limit:,} exceeds the {n:,} images of the {name} {split} split; give at " f"most {n:,}"
        )


def synthetic(split: str = "train", n: int | None = None, shape=(1, 8, 8), num_classes: int = 10, seed: int = 0):
    """A seeded, tiny, learnable data set: class-dependent smooth means plus noise, clipped to [0, 1]."""
    n = n if n is not None else (512 if split == "train" else 128)
    g = torch.Generator().manual_seed(10_000 * seed + 17)
    means = torch.rand((num_classes, *shape), generator=g)
    g2 = torch.Generator().manual_seed(10_000 * seed + (1 if split == "train" else 2))
    y = torch.randint(0, num_classes, (n,), generator=g2)
    x = (means[y] + 0.25 * torch.randn((n, *shape), generator=g2)).clamp(0, 1)
    return x.float(), y.long()


def stratified_indices(y, limit: int, seed: int = 0) -> np.ndarray:
    """A seeded, class-stratified subset of size ``limit`` (sorted: original order kept)."""
    y = np.asarray(y)
    n = len(y)
    if limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts / n * limit).astype(int)
    rem = limit - quota.sum()  # give the remainder to the classes with the largest fractional parts
    frac = counts / n * limit - quota
    quota[np.argsort(-frac, kind="stable")[:rem]] += 1
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=q, replace=False) for c, q in zip(classes, quota)])
    return np.sort(idx)


class LoadOptions(TypedDict, total=False):
    """The keyword options of :func:`load` besides ``with_indices`` (n, shape, num_classes: 'synthetic' only)."""

    root: Any
    limit: int | None
    seed: int
    download: bool
    n: int | None
    shape: tuple
    num_classes: int


@overload
def load(
    name: str, split: str = ..., *, with_indices: Literal[False] = ..., **options: Unpack[LoadOptions]
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def load(
    name: str, split: str = ..., *, with_indices: Literal[True], **options: Unpack[LoadOptions]
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]: ...


def load(
    name: str,
    split: str = "train",
    root=None,
    limit: int | None = None,
    seed: int = 0,
    download: bool = False,
    with_indices: bool = False,
    **synthetic_kwargs,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(x float32 (n, C, H, W) in [0, 1], y int64 (n,)); with ``with_indices`` also the rows of the split taken.

    ``limit``: a class-stratified subset of that size drawn with ``seed`` (original order kept); a limit larger than
    the split is an error, never clipped.
    ``download``: fetch missing files first (see :func:`fetch`); otherwise a missing file is a FileNotFoundError.
    ``synthetic`` takes n, shape, num_classes, seed.
    """
    _check(name, split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise NeuralpathError(f"limit={limit!r} must be a positive integer or None")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's generator needs >= 0
        raise NeuralpathError(f"seed={seed!r} must be an integer >= 0")
    seed = int(seed)
    if name in trees.SETS:  # the oblique-decision-tree sets: (n, d) vectors, generated (seeded, deterministic)
        if synthetic_kwargs:
            raise NeuralpathError(f"unexpected arguments {sorted(synthetic_kwargs)} for dataset {name!r}")
        x, y = _tree_split(name, split)
        idx = np.arange(len(y))
        if limit is not None:
            _too_many(limit, len(y), name, split)
            idx = stratified_indices(y, limit, seed)
        xt, yt = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
        return (xt, yt, idx) if with_indices else (xt, yt)
    if name == "synthetic":
        x, y = synthetic(split, seed=seed, **synthetic_kwargs)
        idx = np.arange(len(y))
        if limit is not None:
            _too_many(limit, len(y), name, split)
            idx = stratified_indices(y.numpy(), limit, seed)
            x, y = x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]
        return (x, y, idx) if with_indices else (x, y)
    if synthetic_kwargs:
        raise NeuralpathError(f"unexpected arguments {sorted(synthetic_kwargs)} for dataset {name!r}")
    root = Path(root) if root else default_root()
    if download:
        fetch(name, root, progress=False, log=lambda *_: None)
    xu, yu = _load_uint8(name, split, root)
    idx = np.arange(len(yu))
    if limit is not None:
        _too_many(limit, len(yu), name, split)
        idx = stratified_indices(yu, limit, seed)
        xu, yu = xu[idx], yu[idx]
    x = torch.from_numpy(np.asarray(xu, dtype=np.float32)).div_(255.0)
    y = torch.from_numpy(np.array(yu, dtype=np.int64))
    return (x, y, idx) if with_indices else (x, y)


def _too_many(limit, n, name, split):
    if limit > n:
        raise NeuralpathError(
            f"{limit:,} images were asked for but the {name} {split} split has {n:,}; give at most " f"{n:,}"
        )


def info(name: str | None = None, root=None) -> list:
    """One dict per data set: where it is, which source, sizes if present."""
    root = Path(root) if root else default_root()
    out = []
    for nm in [name] if name else [n for n in NAMES if n != "synthetic"]:
        check_choice("dataset", nm, NAMES)
        rec: dict[str, Any] = {"name": nm, "root": str(root), "label": source_label(nm, root)}
        if nm == "synthetic" or nm in trees.SETS:
            rec["status"] = "generated on the fly"
        else:
            try:
                # train and test may come from one file (the CIFAR-10 archive): list it once
                rec["files"] = list(dict.fromkeys(str(p) for s in SPLITS for p in _source_files(nm, s, root)))
                rec["status"] = "present"
            except FileNotFoundError as e:
                rec["status"] = f"missing: {e}"
        out.append(rec)
    return out
