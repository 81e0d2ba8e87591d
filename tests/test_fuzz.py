"""Property-based checks (hypothesis): mutated files never crash the readers with anything but the documented
errors, and the kernels of random small networks are symmetric, PSD and agree across methods."""

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralpath import FCDGN, ConvDGN, npf, npk, ntk
from neuralpath.datasets import formats
from neuralpath.errors import NeuralpathError

DOCUMENTED = (NeuralpathError, FileNotFoundError)
COUNTS = {}  # files fuzzed per reader; printed by test_fuzz_counts for docs/RELIABILITY.md


def _count(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


def _idx(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08}[arr.dtype.type]
    return bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()


GOOD_IMAGES = _idx(np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4))
GOOD_LABELS = _idx(np.array([1, 2, 3], dtype=np.uint8))


def mutate(data: bytes, ops):
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b and kind != "insert":
            continue
        p = pos % (len(b) + (1 if kind == "insert" else 0)) if (b or kind == "insert") else 0
        if kind == "flip":
            b[p] ^= 1 << (val % 8)
        elif kind == "set":
            b[p] = val
        elif kind == "insert":
            b.insert(p, val)
        elif kind == "delete":
            del b[p]
        elif kind == "truncate":
            del b[p:]
    return bytes(b)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 10_000), st.integers(0, 255)
    ),
    min_size=1,
    max_size=6,
)
FUZZ = settings(
    max_examples=int(os.environ.get("NEURALPATH_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(ops=OPS, gz=st.booleans(), which=st.sampled_from(["images", "labels"]))
def test_idx_reader_never_crashes(tmp_path, ops, gz, which):
    _count("idx")
    imgs, labs = GOOD_IMAGES, GOOD_LABELS
    if which == "images":
        imgs = mutate(imgs, ops)
    else:
        labs = mutate(labs, ops)
    if gz:
        imgs, labs = (
            gzip.compress(imgs),
            mutate(gzip.compress(labs), ops[:1]) if which == "labels" else gzip.compress(labs),
        )
    pi, pl = tmp_path / "i.idx", tmp_path / "l.idx"
    pi.write_bytes(imgs)
    pl.write_bytes(labs)
    try:
        x, y = formats.read_idx_pair(pi, pl)
    except DOCUMENTED:
        return
    assert x.dtype == np.uint8 and x.ndim == 4 and len(x) == len(y) and ((y >= 0) & (y < 10)).all()


GOOD_CIFAR = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, protocol=2)


@FUZZ
@given(ops=OPS)
def test_cifar_reader_never_crashes(tmp_path, ops):
    _count("cifar")
    p = tmp_path / "data_batch_1"
    p.write_bytes(mutate(GOOD_CIFAR, ops))
    try:
        x, y = formats.read_cifar_batch(p)
    except DOCUMENTED:
        return
    assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)


def _image_tar():
    from PIL import Image

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for c in ("a", "b"):
            im = io.BytesIO()
            Image.new("RGB", (4, 4), (10, 20, 30)).save(im, format="PNG")
            ti = tarfile.TarInfo(f"root/train/{c}/0.png")
            ti.size = len(im.getvalue())
            tar.addfile(ti, io.BytesIO(im.getvalue()))
    return buf.getvalue()


GOOD_TAR = _image_tar()


@FUZZ
@given(ops=OPS, raw=st.booleans())
def test_image_folder_reader_never_crashes(tmp_path, ops, raw):
    _count("image-folder")
    data = GOOD_TAR if not raw else gzip.decompress(GOOD_TAR)
    p = tmp_path / "imgs.tar"
    p.write_bytes(mutate(data, ops))
    try:
        x, y, classes = formats.read_image_folder(p, "train")
    except DOCUMENTED:
        return
    assert x.ndim == 4 and len(x) == len(y) and len(classes) >= 1


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 6),
    depth=st.integers(2, 4),
    n=st.integers(1, 5),
    d_in=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fc_kernels_symmetric_psd_and_agree(width, depth, n, d_in, bias, seed):
    _count("fc-kernel")
    g = torch.Generator().manual_seed(seed)
    net = FCDGN(in_dim=d_in, width=width, depth=depth, out_dim=2, bias=bias, gate="hard", generator=g).double()
    with torch.no_grad():
        for m in list(net.value_layers) + list(net.feature_layers):
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    K = npk(net, x)
    F = npf(net, x)
    torch.testing.assert_close(K, F @ F.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(K, K.T, rtol=0, atol=0)
    assert torch.linalg.eigvalsh(K).min() >= -1e-9 * max(1.0, K.diagonal().max().item())
    ks = ntk(net, x, params="value")
    kj = ntk(net, x, params="value", method="jacobian")
    torch.testing.assert_close(ks, kj, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(ks).min() >= -1e-8 * max(1.0, ks.diagonal().max().item())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3), soft=st.booleans())
def test_conv_ntk_methods_agree(seed, n, soft):
    _count("conv-kernel")
    g = torch.Generator().manual_seed(seed)
    net = ConvDGN(
        "gconv",
        in_channels=1,
        out_dim=2,
        channels=(2, 2),
        hidden=(3,),
        image_size=5,
        gate="soft" if soft else "hard",
        generator=g,
    ).double()
    x = torch.rand(n, 1, 5, 5, generator=g, dtype=torch.float64)
    a = ntk(net, x, params="all")
    b = ntk(net, x, params="all", method="jacobian")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a, a.T, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    conv=st.booleans(),
    kinds=st.lists(
        st.tuples(
            st.sampled_from(["tied", "hard", "soft"]),
            st.sampled_from(["relu", "linear", "shallow"]),
            st.sampled_from(["x", "ones"]),
            st.booleans(),  # frozen feature network
        ),
        min_size=1,
        max_size=3,
    ),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_stacks_compute_each_network_as_given(conv, kinds, bias, seed):
    """Session 10: the engine's stacks (FCStack when the nets allow it, LoopStack always) against each network's
    own forward, on training batches (cached frozen gates) and shared inputs, for any mix of tied, hard and soft nets,
    gating networks, value inputs and frozen features (float64). Found the frozen soft-gate cache bug."""
    from neuralpath.stacks import make_stack

    _count("stack")
    g = torch.Generator().manual_seed(seed)
    shape = dict(arch="gconv", in_channels=2, channels=(3,), hidden=(4,), image_size=4) if conv else dict(in_dim=6)
    nets = []
    for gate, gating, value_input, frozen in kinds:
        kw = dict(tied=True) if gate == "tied" else dict(gate=gate, gating=gating, value_input=value_input)
        net = (ConvDGN if conv else FCDGN)(out_dim=3, bias=bias, generator=g, **shape, **kw).double()
        with torch.no_grad():
            for m in list(net.value_layers) + list(net.feature_layers):
                if m.bias is not None:
                    m.bias.normal_(0, 0.3, generator=g)
        nets.append(net.freeze_features() if frozen and gate != "tied" else net)
    x = torch.randn(9, *nets[0].input_shape, dtype=torch.float64, generator=g)
    rows = [torch.randperm(9, generator=g)[:6] for _ in nets]
    for fast in (True, False):
        stack = make_stack(nets, fast=fast)
        stack.cache_frozen_gates(x, rows)
        sel = torch.stack([r[:4] for r in rows])
        out, shared = stack.forward(x[sel], sel).detach(), stack.forward_shared(x).detach()
        with torch.no_grad():
            for r, net in enumerate(nets):
                torch.testing.assert_close(out[r], net(x[sel[r]]), rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(shared[r], net(x), rtol=1e-10, atol=1e-10)


def test_fuzz_counts(capsys):
    # runs last in this module: the numbers quoted in docs/RELIABILITY.md
    with capsys.disabled():
        print(f"\nfuzz counts: {COUNTS}")
    assert sum(COUNTS.values()) > 0 or pytest.skip("run with the module")


def test_cifar_reader_refuses_an_object_array_over_raw_bytes(tmp_path):
    """Found by the fuzzer (a worker crashed): numpy rebuilds an object-dtype array from raw bytes as pointers, and
    touching it segfaults (checked by hand: exit status 139). The reader now runs no numpy code on a file's state;
    such a batch gets a one-line error."""
    good = pickle.dumps({b"data": np.full(768, 7, np.uint8), b"labels": [3]}, protocol=2)
    bad = good.replace(b"X\x02\x00\x00\x00u1", b"X\x02\x00\x00\x00O8").replace(b"M\x00\x03\x85", b"K\x60\x85")
    assert bad != good
    p = tmp_path / "data_batch_1"
    p.write_bytes(bad)
    with pytest.raises(NeuralpathError, match="refused dtype 'O8'"):
        formats.read_cifar_batch(p)


@pytest.mark.parametrize(
    "stream, needle",
    [
        (b"\x80\x02}r\x00\x00\x00\x40.", "memo index 1073741824"),  # LONG_BINPUT 2^30: a 16 GB memo table
        (b"\x80\x03cbuiltins\nbytes\nJ\x00\x00\x00\x7f\x85R.", "takes bytes or text"),  # bytes(2130706432)
    ],
    ids=["memo-index", "bytes-of-int"],
)
def test_cifar_reader_refuses_streams_that_allocate_gigabytes(tmp_path, stream, needle):
    """Found by the fuzzer (session 8: a worker was killed for memory at 17 GB): a 9-byte batch with one huge memo
    index made the unpickler grow its memo to 16 GB, and ``bytes(n)`` of a pickled int allocated n bytes. The reader
    walks the opcodes first and builds bytes only from bytes or text; both are one-line errors."""
    p = tmp_path / "data_batch_1"
    p.write_bytes(stream)
    with pytest.raises(NeuralpathError, match=needle):
        formats.read_cifar_batch(p)
