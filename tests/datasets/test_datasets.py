import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralpath import datasets
from neuralpath.datasets import formats, sources
from neuralpath.datasets.sources import Resource
from neuralpath.errors import NeuralpathError


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08}[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.tobytes()


def test_mnist_loads_with_known_shapes_counts_and_order(mnist_root):
    x, y = datasets.load("mnist", "train", root=mnist_root)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert y.dtype == torch.int64 and y.bincount().tolist() == datasets.CLASS_COUNTS[("mnist", "train")]
    xt, yt = datasets.load("mnist", "test", root=mnist_root)
    assert yt.bincount().tolist() == datasets.CLASS_COUNTS[("mnist", "test")]
    assert yt[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the original test order


def test_stratified_limit(mnist_root):
    x, y = datasets.load("mnist", "train", root=mnist_root, limit=1000, seed=3)
    assert len(y) == 1000 and y.bincount().min() >= 90
    x2, y2 = datasets.load("mnist", "train", root=mnist_root, limit=1000, seed=3)
    assert torch.equal(x, x2)
    with pytest.raises(NeuralpathError, match="limit"):
        datasets.load("mnist", "train", root=mnist_root, limit=0)


@pytest.mark.parametrize("layout", ["raw", "gz"])
@pytest.mark.parametrize("damage", ["truncate", "magic", "flip"])
def test_corrupt_mnist_refused(mnist_root, tmp_path, layout, damage, cli):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        data = sources._read_content(f)
        name = f.name.removesuffix(".gz")
        if name == "t10k-images-idx3-ubyte":
            data = bytearray(data)
            if damage == "truncate":
                data = data[: len(data) // 2]
            elif damage == "magic":
                data[2] = 0x77
            else:
                data[5000] ^= 0xFF
            data = bytes(data)
        if layout == "gz":
            (raw / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (raw / name).write_bytes(data)
    with pytest.raises(NeuralpathError, match="t10k-images"):
        datasets.load("mnist", "test", root=tmp_path)
    out = tmp_path / "run"
    r = cli(
        "train", "--dataset", "mnist", "--data-root", tmp_path, "--epochs", "1", "--limit-train", "100", "--out", out
    )
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (out / "result.json").exists()


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        datasets.load("imagenet")
    with pytest.raises(ValueError, match="split='val'"):
        datasets.load("mnist", "val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="data fetch mnist"):
        datasets.load("mnist", root=tmp_path)


def test_idx_parser_errors():
    good = idx_bytes(np.zeros((3, 2, 2), np.uint8))
    assert formats.parse_idx(good).shape == (3, 2, 2)
    for bad, msg in (
        (b"", "magic"),
        (b"\x01\x00\x08\x01", "magic"),
        (good[:6], "truncated"),
        (good[:-1], "holds"),
        (good + b"x", "holds"),
        (bytes([0, 0, 0x42, 1]) + good[4:], "header"),
    ):
        with pytest.raises(NeuralpathError, match=msg):
            formats.parse_idx(bad)


def test_label_out_of_range(tmp_path):
    (tmp_path / "i").write_bytes(idx_bytes(np.zeros((2, 2, 2), np.uint8)))
    (tmp_path / "l").write_bytes(idx_bytes(np.array([1, 12], np.uint8)))
    with pytest.raises(NeuralpathError, match="label out of range"):
        formats.read_idx_pair(tmp_path / "i", tmp_path / "l")


def test_synthetic_is_seeded_and_shaped():
    x, y = datasets.load("synthetic", "train", n=50, shape=(3, 5, 5), num_classes=4, seed=2)
    assert x.shape == (50, 3, 5, 5) and 0 <= x.min() and x.max() <= 1 and y.max() < 4
    x2, _ = datasets.load("synthetic", "train", n=50, shape=(3, 5, 5), num_classes=4, seed=2)
    assert torch.equal(x, x2)


# -- HTTP source against a local server ------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        mode, _, name = name.partition("__") if "__" in name else ("ok", "", name)
        data = self.files.get(self.path.split("/")[-2] + "/" + name)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.path.split("/")[-2] == "drop":
            self.wfile.write(data[: len(data) // 2])  # then the connection closes early
        else:
            self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_verifies_checksums_and_survives_drops(server, tmp_path, monkeypatch):
    imgs = idx_bytes(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    labs = idx_bytes(np.array([3, 1], np.uint8))
    res = [
        Resource("train-images-idx3-ubyte", hashlib.md5(imgs).hexdigest()),
        Resource("train-labels-idx1-ubyte", hashlib.md5(labs).hexdigest()),
    ]
    wrong = imgs[:-1] + b"\x09"
    _Handler.files = {
        "good/train-images-idx3-ubyte.gz": gzip.compress(imgs),
        "good/train-labels-idx1-ubyte.gz": gzip.compress(labs),
        "bad/train-images-idx3-ubyte.gz": gzip.compress(wrong),
        "bad/train-labels-idx1-ubyte.gz": gzip.compress(labs),
        "drop/train-images-idx3-ubyte.gz": gzip.compress(imgs),
        "drop/train-labels-idx1-ubyte.gz": gzip.compress(labs),
    }
    # wrong checksum and dropped connection: refused, nothing left behind
    for mirror in ("bad", "drop"):
        with pytest.raises(NeuralpathError, match="every source failed"):
            sources.fetch_idx("mnist", tmp_path, mirrors=[f"{server}/{mirror}/"], resources=res[:1], use_npm=False)
        assert (
            not any(sources.raw_dir("mnist", tmp_path).glob("*"))
            if sources.raw_dir("mnist", tmp_path).exists()
            else True
        )
    # the bad mirror first, then the good one: the good copy is used
    rep = sources.fetch_idx(
        "mnist", tmp_path, mirrors=[f"{server}/bad/", f"{server}/good/"], resources=res, use_npm=False
    )
    assert all("downloaded" in v for v in rep.values())
    got = formats.parse_idx(formats.open_maybe_gz(sources.raw_dir("mnist", tmp_path) / "train-images-idx3-ubyte.gz"))
    assert got.shape == (2, 3, 3)
    # idempotent: a second fetch finds the verified files
    rep = sources.fetch_idx("mnist", tmp_path, mirrors=[f"{server}/bad/"], resources=res, use_npm=False)
    assert all(v.startswith("present") for v in rep.values())


# -- CIFAR-10 formats and untrusted files -----------------------------------------------------------
def _cifar_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": [0, 1, 2, 9],
            b"batch_label": b"x",
            b"filenames": [b"a", b"b", b"c", b"d"],
        }
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    return d


def test_cifar_batches_read(tmp_path):
    _cifar_folder(tmp_path)
    x, y = datasets.load("cifar10", "train", root=tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.tolist()[:4] == [0, 1, 2, 9]
    assert datasets.source_label("cifar10", tmp_path) == "CIFAR-10"


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_cifar_pickle_refused(tmp_path):
    d = _cifar_folder(tmp_path)
    e = _Evil()
    e.target = str(tmp_path / "pwned")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": e, b"labels": []}))
    with pytest.raises(NeuralpathError, match="refused"):
        datasets.load("cifar10", "test", root=tmp_path)
    assert not (tmp_path / "pwned").exists()


def _tar_with(tmp_path, name, add):
    p = tmp_path / name
    with tarfile.open(p, "w:gz") as tar:
        add(tar)
    return p


def test_safe_extract_refuses_traversal_links_and_absolute(tmp_path):
    def member(tar, name, data=b"x", kind=tarfile.REGTYPE, link=""):
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    cases = {
        "dotdot": lambda t: member(t, "../evil.txt"),
        "abs": lambda t: member(t, "/tmp/evil.txt"),
        "link": lambda t: member(t, "l", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        "dev": lambda t: member(t, "d", kind=tarfile.CHRTYPE),
    }
    for name, add in cases.items():
        p = _tar_with(tmp_path, name + ".tar.gz", add)
        dest = tmp_path / ("out_" + name)
        with pytest.raises(NeuralpathError, match="refused"):
            formats.safe_extract(p, dest)
        assert not (tmp_path / "evil.txt").exists() and not (dest.exists() and any(dest.iterdir()))


def test_image_folder_tar_and_dir(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("cat", "ant"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(root / split / c / f"{i}.png")
    x, y, classes = formats.read_image_folder(root, "train")
    assert x.shape == (4, 3, 4, 4) and classes == ["ant", "cat"] and y.tolist() == [0, 0, 1, 1]
    tgz = tmp_path / "imgs.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    x2, y2, _ = formats.read_image_folder(tgz, "train")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_shared_cifar_jpeg_copy(tmp_path):
    src = sources.find_shared_jpeg()
    if src is None:
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not present")
    rep = datasets.fetch("cifar10", tmp_path, mirrors=["http://127.0.0.1:9/nothing"], log=lambda *_: None)
    assert "JPEG" in rep["cifar10"]
    assert datasets.source_label("cifar10", tmp_path) == "CIFAR-10 (JPEG copy)"
    x, y = datasets.load("cifar10", "test", root=tmp_path)
    assert x.shape == (10000, 3, 32, 32) and y.bincount().tolist() == [1000] * 10
    assert abs(x[:, 0].mean().item() - 0.49) < 0.02
    [rec] = datasets.info("cifar10", tmp_path)  # train and test come from the one archive: listed once
    assert rec["status"] == "present" and len(rec["files"]) == len(set(rec["files"])) == 1, rec
