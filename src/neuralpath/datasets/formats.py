"""Readers for the data formats neuralpath understands. Every reader refuses bad files with one clear error.

- IDX (MNIST, Fashion-MNIST), raw or gzipped
- the official CIFAR-10 python batches, through a restricted unpickler
- an image-folder tree ``<split>/<class>/<file>``, unpacked or inside a .tar.gz
- safe extraction of tar archives (no absolute paths, no '..', no links or devices)
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import NeuralpathError


def member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    """The content of a regular-file member of an open tar archive."""
    f = tar.extractfile(m)
    if f is None:
        raise NeuralpathError(f"{m.name} in the archive is not a regular file")
    return f.read()


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def open_maybe_gz(path) -> bytes:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise NeuralpathError(f"{path}: corrupt gzip stream ({e}); delete it and fetch the data again") from None
    return data


def parse_idx(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file: magic 0x0000 <type> <ndim>, ndim big-endian uint32 sizes, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise NeuralpathError(
            f"{where}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
            "delete it and fetch the data again"
        )
    dtype, ndim = data[2], data[3]
    if dtype not in IDX_DTYPES or ndim == 0 or ndim > 4:
        raise NeuralpathError(
            f"{where}: bad IDX header (type 0x{dtype:02x}, {ndim} dimensions); delete it and fetch again"
        )
    if len(data) < 4 + 4 * ndim:
        raise NeuralpathError(f"{where}: truncated IDX header; delete it and fetch the data again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(IDX_DTYPES[dtype])
    expected = int(np.prod(shape)) * dt.itemsize
    body = len(data) - 4 - 4 * ndim
    if body != expected:
        raise NeuralpathError(
            f"{where}: IDX header says shape {shape} ({expected} bytes) but the file holds {body} bytes "
            "(truncated or inconsistent); delete it and fetch the data again"
        )
    return np.frombuffer(data, dtype=dt, offset=4 + 4 * ndim).reshape(shape)


def read_idx_pair(images_path, labels_path, num_classes: int = 10):
    """(x uint8 (n, 1, H, W), y int64 (n,)) from an IDX image file and its label file."""
    x = parse_idx(open_maybe_gz(images_path), str(images_path))
    y = parse_idx(open_maybe_gz(labels_path), str(labels_path))
    if x.ndim != 3 or x.dtype != np.uint8:
        raise NeuralpathError(f"{images_path}: expected a 3-d uint8 IDX image file, got shape {x.shape} {x.dtype}")
    if y.ndim != 1:
        raise NeuralpathError(f"{labels_path}: expected a 1-d IDX label file, got shape {y.shape}")
    if len(x) != len(y):
        raise NeuralpathError(f"{images_path} has {len(x)} images but {labels_path} has {len(y)} labels")
    check_labels(y, num_classes, labels_path)
    return x[:, None], y.astype(np.int64)


def check_labels(y, num_classes, where):
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise NeuralpathError(
            f"{where}: label out of range (min {int(y.min())}, max {int(y.max())}, "
            f"expected 0..{num_classes - 1}); the file is corrupt"
        )


# -- CIFAR-10 python batches ------------------------------------------------------------------------
_INT_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}


class _Dtype:
    """Stand-in for numpy.dtype while unpickling: records the spec and byte order, runs no numpy code."""

    def __init__(self, spec=None, align=False, copy=False):
        self.spec, self.order = spec, "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def resolve(self) -> np.dtype:
        spec = self.spec.decode("latin1") if isinstance(self.spec, bytes) else self.spec
        if not isinstance(spec, str) or spec not in _INT_DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {spec!r}: a CIFAR-10 batch holds integer arrays only")
        return np.dtype(spec).newbyteorder(">" if self.order == ">" else "<" if self.order == "<" else "=")


class _Array:
    """Stand-in for numpy's array reconstruction: records (version, shape, dtype, fortran, raw bytes) and builds
    the array afterwards from checked bytes (numpy's own __setstate__ on crafted state can crash the process)."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def build(self) -> np.ndarray:
        st = self.state
        if not (isinstance(st, tuple) and len(st) == 5 and isinstance(st[2], _Dtype) and isinstance(st[4], bytes)):
            raise pickle.UnpicklingError("malformed array in a CIFAR-10 batch")
        shape = st[1]
        if not isinstance(shape, tuple) or not all(isinstance(v, int) and v >= 0 for v in shape):
            raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
        dt = st[2].resolve()
        count = 1
        for v in shape:
            count *= v
        if count * dt.itemsize != len(st[4]):
            raise pickle.UnpicklingError(f"array of shape {shape} needs {count * dt.itemsize} bytes, has {len(st[4])}")
        return np.frombuffer(st[4], dtype=dt).reshape(shape, order="F" if st[3] else "C").copy()


def _scalar(dtype, raw=b""):
    if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes):
        raise pickle.UnpicklingError("malformed numpy scalar in a CIFAR-10 batch")
    dt = dtype.resolve()
    if len(raw) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {dt} needs {dt.itemsize} bytes, has {len(raw)}")
    return int(np.frombuffer(raw, dtype=dt)[0])


def _bytes(*args):
    """Stand-in for ``bytes`` while unpickling: bytes from bytes or text only. ``bytes(n)`` of an integer would
    allocate n zero bytes on the file's word (a 30-byte file asked for 2 GB)."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return args[0].encode(args[1])
    raise pickle.UnpicklingError("bytes(...) in a CIFAR-10 batch takes bytes or text, not " + type(args[0]).__name__)


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
_MEMO_LIMIT = 1 << 16  # an official batch memoises a few dozen objects


def _check_opcodes(data: bytes):
    """Walk the pickle's opcodes without running them (pickletools): refuse a malformed stream and memo indices
    no CIFAR-10 batch uses. The unpickler grows its memo table to the largest index it sees: one 5-byte opcode
    with index 2^30 made it allocate 16 GB and the process was killed for memory."""
    import pickletools

    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _MEMO_OPS and isinstance(arg, int) and arg >= _MEMO_LIMIT:
                raise pickle.UnpicklingError(f"memo index {arg} at byte {pos}: not what a CIFAR-10 batch holds")
    except (ValueError, TypeError) as e:
        raise pickle.UnpicklingError(f"malformed pickle stream ({e})") from None


def _materialize(obj, depth=0):
    """Replace the stand-ins by checked numpy arrays and ints (dicts and lists walked)."""
    if depth > 20:
        raise pickle.UnpicklingError("a CIFAR-10 batch is not nested this deep")
    if isinstance(obj, _Array):
        return obj.build()
    if isinstance(obj, _Dtype):
        raise pickle.UnpicklingError("a bare dtype in a CIFAR-10 batch")
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, depth + 1) for v in obj]
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR-10 batches contain: numpy integer arrays and scalars, and builtins data.
    numpy's globals are replaced by stand-ins (:class:`_Array`, :class:`_Dtype`, :func:`_scalar`) so that no numpy
    code runs on the file's state: a crafted batch (an object dtype over raw bytes) once crashed the process."""

    STANDINS = {
        ("numpy.core.multiarray", "_reconstruct"): _Array,
        ("numpy._core.multiarray", "_reconstruct"): _Array,
        ("numpy", "ndarray"): _Array,
        ("numpy", "dtype"): _Dtype,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("builtins", "bytes"): _bytes,
    }
    ALLOWED = {("_codecs", "encode"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self.STANDINS:
            return self.STANDINS[(module, name)]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: not allowed in a CIFAR-10 batch")


def read_cifar_batch(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = path.read_bytes()
        _check_opcodes(data)
        d = _materialize(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())
    except pickle.UnpicklingError as e:
        raise NeuralpathError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbage bytes
        raise NeuralpathError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise NeuralpathError(f"{path}: not a CIFAR-10 python batch (no b'data'/b'labels' keys)")
    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise NeuralpathError(f"{path}: unexpected CIFAR-10 batch contents (data {x.shape} {x.dtype}, {len(y)} labels)")
    check_labels(y, 10, path)
    return x.reshape(-1, 3, 32, 32), y


def read_cifar_batches(folder, split: str):
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -- image folders ----------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _decode(data: bytes, where: str, channels: int):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise NeuralpathError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def read_image_folder(path, split: str, channels: int = 3, progress: bool = False):
    """Images of ``<path>/<split>/<class>/<file>`` (a folder, or a .tar.gz whose members sit under one top folder).

    Classes are the sorted class-folder names; samples are ordered by class, then file name.
    Returns (x uint8 (n, C, H, W), y int64 (n,), classes).
    """
    from tqdm import tqdm

    path = Path(path)
    items = []  # (class, name, bytes-or-path)
    if path.is_dir():
        root = path / split
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no '{split}' folder in the image-folder tree {path}")
        for f in sorted(root.glob("*/*")):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                items.append((f.parent.name, f.name, f))
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    parts = PurePosixPath(m.name).parts
                    if len(parts) >= 3 and parts[-3] == split and PurePosixPath(m.name).suffix.lower() in IMAGE_EXTS:
                        items.append((parts[-2], parts[-1], member_bytes(tar, m)))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise NeuralpathError(f"{path}: unreadable archive ({e})") from None
    else:
        raise FileNotFoundError(f"{path}: no such image folder or archive")
    if not items:
        raise NeuralpathError(f"{path}: no images found under '{split}/<class>/'")
    items.sort(key=lambda t: (t[0], t[1]))
    classes = sorted({c for c, _, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    xs, ys = [], []
    for c, name, src in tqdm(items, desc=f"decoding {path.name}:{split}", disable=not progress, leave=False):
        data = src.read_bytes() if isinstance(src, Path) else src
        xs.append(_decode(data, f"{path}:{split}/{c}/{name}", channels))
        ys.append(index[c])
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise NeuralpathError(f"{path}: images have different sizes {sorted(shapes)[:3]}; resize them to one size")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def safe_extract(tar_path, dest, members_filter=None):
    """Extract a tar archive refusing absolute paths, '..', links, devices and other special files."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
                    raise NeuralpathError(f"{tar_path}: refused unsafe member path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise NeuralpathError(f"{tar_path}: refused member {m.name!r} (links and devices are not allowed)")
                if not (dest / p).resolve().is_relative_to(dest):
                    raise NeuralpathError(f"{tar_path}: refused member {m.name!r} escaping {dest}")
            for m in members:
                if members_filter and not members_filter(m.name):
                    continue
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                from ..io import write_bytes

                write_bytes(target, member_bytes(tar, m))
    except (tarfile.TarError, EOFError) as e:
        raise NeuralpathError(f"{tar_path}: corrupt archive ({e})") from None
