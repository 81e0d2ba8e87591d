import math

import numpy as np
import pytest
import torch
from conftest import randomize_biases

import neuralpath as npx
from neuralpath.errors import NeuralpathError
from neuralpath.paths import path_count
from neuralpath.testing import KernelTestBase

F64 = torch.float64


def small_nets():
    torch.manual_seed(0)
    out = []
    for bias in (False, True):
        for gate in ("hard", "soft"):
            out.append(
                randomize_biases(
                    npx.FCDGN(in_dim=5, width=4, depth=4, out_dim=3, gate=gate, bias=bias, init="gaussian").double()
                )
            )
            for arch in ("vconv", "gconv"):
                out.append(
                    randomize_biases(
                        npx.ConvDGN(
                            arch,
                            in_channels=2,
                            out_dim=3,
                            channels=(2, 3),
                            hidden=(3,),
                            image_size=4,
                            gate=gate,
                            bias=bias,
                        ).double()
                    )
                )
    out.append(npx.FCDGN(in_dim=5, width=4, depth=3, out_dim=2, tied=True).double())
    out.append(
        npx.ConvDGN("gconv", in_channels=1, out_dim=2, channels=(2,), hidden=(), image_size=3, tied=True).double()
    )
    return out


def inputs(net, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (net.in_dim,) if isinstance(net, npx.FCDGN) else (net.in_channels, net.image_size, net.image_size)
    return torch.randn((n, *shape), generator=g, dtype=F64)


@pytest.mark.parametrize("net", small_nets(), ids=lambda n: f"{type(n).__name__}-{n.gate_kind}-b{n.has_bias}")
def test_npf_npv_identity_and_npk_equals_gram_of_npf(net):
    x = inputs(net, 6)
    phi, v = npx.npf(net, x), npx.npv(net)
    assert phi.shape[1] == v.shape[0] == path_count(net)
    y = net(x)
    assert torch.allclose(phi @ v, y, atol=1e-10 * max(1.0, y.abs().max().item()), rtol=0)
    H = phi @ phi.T
    K = npx.npk(net, x)
    assert (K - H).abs().max().item() <= 1e-10 * H.abs().max().item()
    x2 = inputs(net, 4, seed=1)
    H12 = phi @ npx.npf(net, x2).T
    assert (npx.npk(net, x, x2) - H12).abs().max().item() <= 1e-10 * H12.abs().max().item()


def test_fc_path_count_and_closed_form():
    net = npx.FCDGN(in_dim=5, width=4, depth=4, out_dim=3, bias=False).double()
    assert path_count(net) == 5 * 4**3
    x = inputs(net, 5)
    G = net.gates(x)
    H = (x @ x.T) * math.prod(g @ g.T for g in G)
    assert torch.allclose(npx.npk(net, x), H, rtol=1e-12, atol=0)
    ov = npx.overlaps(net, x)
    assert all(torch.equal(o, g @ g.T) for o, g in zip(ov, G))


def test_lambda_counts_active_paths_for_hard_gates():
    net = npx.FCDGN(in_dim=3, width=5, depth=4, out_dim=2, bias=False).double()
    x = inputs(net, 4)
    phi = npx.npf(net, x)
    # Lambda(x, x) = prod_l overlap_l(x, x) = number of active paths from one input node
    lam = math.prod(o.diagonal() for o in npx.overlaps(net, x))
    active = (phi != 0).sum(1).double() / 3  # each input node starts the same number of paths
    x_nonzero = (x != 0).all(1)
    assert x_nonzero.all()
    assert torch.equal(lam, active)


def test_npf_refuses_too_many_paths_with_the_count():
    net = npx.FCDGN(in_dim=784, width=128, depth=6, out_dim=10)
    with pytest.raises(NeuralpathError, match="paths"):
        npx.npf(net, torch.rand(2, 784))


def test_npk_float64_and_normalisations():
    net = npx.FCDGN(in_dim=6, width=8, depth=4, out_dim=2)
    x = torch.rand(7, 6)
    K64 = npx.npk(net, x, dtype=F64)
    assert K64.dtype == F64
    K32 = npx.npk(net, x)
    assert torch.allclose(K32.double(), K64, rtol=1e-4)
    Kt = npx.npk(net, x, normalize="trace", dtype=F64)
    assert abs(Kt.trace().item() - 1) < 1e-12 and torch.allclose(Kt, K64 / K64.trace())
    Kc = npx.npk(net, x, normalize="cosine", dtype=F64)
    d = K64.diagonal()
    assert torch.allclose(Kc, K64 / torch.sqrt(d[:, None] * d[None, :]), rtol=1e-12)
    with pytest.raises(ValueError, match="normalize='bogus'"):
        npx.npk(net, x, normalize="bogus")


def test_no_overflow_for_deep_wide_nets():
    net = npx.FCDGN(in_dim=20, width=2048, depth=14, out_dim=2, init="gaussian")  # prod overlap ~ 1e43 > float32
    x = torch.rand(4, 20)
    with pytest.raises(NeuralpathError, match="overflows"):
        npx.npk(net, x)
    Kc = npx.npk(net, x, normalize="cosine")
    assert torch.isfinite(Kc).all() and torch.allclose(Kc.diagonal(), torch.ones(4), atol=1e-5)
    K64 = npx.npk(net, x, dtype=F64)
    assert torch.isfinite(K64).all() and K64.max() > 1e38


def test_memmap_output_and_refusal(tmp_path):
    net = npx.FCDGN(in_dim=6, width=8, depth=3, out_dim=2)
    x = torch.rand(11, 6)
    out = tmp_path / "k.npy"
    assert npx.npk(net, x, out=out, block=4) == out
    assert np.allclose(np.load(out), npx.npk(net, x).numpy(), rtol=1e-6)
    assert not list(tmp_path.glob(".*partial*"))
    from neuralpath.kernels.gram import check_size

    with pytest.raises(NeuralpathError, match="GiB"):
        check_size(10**6, 10**6, 4, None)
    with pytest.raises(NeuralpathError, match="free"):
        check_size(10**8, 10**8, 8, tmp_path / "huge.npy")


def test_bad_inputs():
    net = npx.FCDGN(in_dim=6, width=8, depth=3, out_dim=2)
    with pytest.raises(NeuralpathError, match="NaN"):
        npx.npk(net, torch.full((2, 6), float("nan")))
    with pytest.raises(NeuralpathError, match="x1 has per-example shape"):
        npx.npk(net, torch.rand(2, 6), torch.rand(2, 7))
    with pytest.raises(TypeError, match="FCDGN, a ConvDGN"):
        npx.npk(torch.nn.Linear(2, 2), torch.rand(2, 2))


class TestNPKBattery(KernelTestBase):
    methods = ("closed_form", "paths")

    def kernel(self, net, x1, x2=None, **kw):
        if isinstance(net, npx.anynet.ModuleDGN):
            kw.pop("block", None)
        return npx.npk(net, x1, x2, **kw)

    def cases(self):
        nets = [
            randomize_biases(npx.FCDGN(in_dim=5, width=6, depth=4, out_dim=2, gate="soft").double()),
            randomize_biases(
                npx.ConvDGN("gconv", in_channels=2, out_dim=2, channels=(3, 2), hidden=(4,), image_size=5).double()
            ),
            npx.ConvDGN("vconv", in_channels=1, out_dim=2, channels=(3,), hidden=(4,), image_size=5).double(),
        ]
        out = [(n, inputs(n, 7), inputs(n, 5, seed=3)) for n in nets]
        model = (
            torch.nn.Sequential(
                torch.nn.Conv2d(2, 2, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Flatten(),
                torch.nn.Linear(8, 2),
            )
            .double()
            .eval()
        )
        g = torch.Generator().manual_seed(4)
        xm = torch.rand(6, 2, 4, 4, dtype=torch.float64, generator=g)
        out.append((npx.from_module(model, xm[:2]), xm, torch.rand(4, 2, 4, 4, dtype=torch.float64, generator=g)))
        return out


def arccos_overlaps(x1, x2, depth):
    """Infinite-width limit of overlap_l / w for Gaussian weights: (pi - theta_l) / (2 pi), theta_l from the
    arc-cosine (ReLU) recursion on the pre-activation covariances."""
    k11, k22, k12 = (x1 * x1).sum(), (x2 * x2).sum(), (x1 * x2).sum()
    out = []
    for _ in range(depth - 1):
        theta = torch.arccos((k12 / torch.sqrt(k11 * k22)).clamp(-1, 1))
        out.append((math.pi - theta) / (2 * math.pi))
        # next layer's pre-activation covariance with weights N(0, 2/fan_in): relu arc-cosine kernel (He scaling)
        k12 = torch.sqrt(k11 * k22) / math.pi * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta))
    return torch.stack(out)


def test_infinite_width_oracle_error_falls_with_width():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, generator=g, dtype=F64)
    oracle = arccos_overlaps(x[0], x[1], 4)
    errs = []
    for w in (32, 256, 2048):
        e = []
        for s in range(6):
            net = npx.FCDGN(
                in_dim=30,
                width=w,
                depth=4,
                out_dim=1,
                bias=False,
                init="gaussian",
                generator=torch.Generator().manual_seed(s),
            ).double()
            ov = torch.stack([o[0, 1] / w for o in npx.overlaps(net, x)])
            e.append((ov - oracle).abs().max().item())
        errs.append(float(np.mean(e)))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


def test_bit_packed_conv_gates_give_the_same_kernel(monkeypatch):
    """Hard conv gates are kept bit-packed and unpacked per tile (the row block's once per row); the kernel must equal
    the one from float gates to rounding, with channel counts that are and are not multiples of 8, over several
    row and column blocks (the smallest conv block is 16 inputs)."""
    from neuralpath.kernels import npk as npk_module

    net = randomize_biases(
        npx.ConvDGN("gconv", in_channels=2, out_dim=3, channels=(3, 9, 8), hidden=(5,), image_size=6, tied=True)
    ).double()
    x = torch.rand(40, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x2 = torch.rand(21, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    packed = npx.npk(net, x, block=16), npx.npk(net, x, x2, block=16)
    real = npk_module.featurize
    monkeypatch.setattr(npk_module, "featurize", lambda net, x, compact=False: real(net, x, compact=False))
    floats = npx.npk(net, x, block=16), npx.npk(net, x, x2, block=16)
    for a, b in zip(packed, floats):
        assert (a - b).abs().max().item() <= 1e-12 * b.abs().max().item()
    g = torch.rand(3, 11, 2, 3) > 0.5  # 11 channels: padded to 16 with closed gates
    unpacked = npk_module._unpack_pm(npk_module._pack_pm(g), torch.float64)
    assert unpacked.shape == (6, 3, 16) and unpacked[:, :, 11:].sum().item() == 0
    assert torch.equal(unpacked[:, :, :11], npk_module._pm(g.double()))


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("gconv", dict(channels=(3, 9, 8), hidden=(5,), tied=True)),  # bits, 9 channels padded to 16
        # bits, a 5 x 5 window, 5 input channels (the input's product as per-row GEMMs)
        ("vconv", dict(in_channels=5, channels=(4, 6), hidden=(5, 4), tied=True, bias=False, kernel_size=5)),
        ("gconv", dict(channels=(4, 6), hidden=(5,), gate="soft")),  # float gates (DLNPF-style soft gates)
    ],
)
@pytest.mark.parametrize("bf16", ["0", "1"])
def test_compiled_tile_passes_equal_the_tensor_op_loop(monkeypatch, arch, kw, bf16):
    """The conv tile loop with one compiled pass per layer (kernels/fused.py, zero-bordered buffers, per-row GEMMs)
    against the tensor-op loop, float64, symmetric and rectangular kernels over several tiles of unequal shapes; with
    NEURALPATH_BF16=1 hard gates take the bfloat16-count GEMMs (soft gates never do)."""
    from neuralpath.kernels import npk as npk_module

    monkeypatch.setenv("NEURALPATH_BF16", bf16)
    seen = []
    real = npk_module._pair_conv_fused

    def spy(*a, **k):
        seen.append(a[-1] if len(a) > 7 else k.get("counts", False))
        return real(*a, **k)

    monkeypatch.setattr(npk_module, "_pair_conv_fused", spy)
    kw = {"in_channels": 2, **kw}
    net = randomize_biases(npx.ConvDGN(arch, out_dim=3, image_size=6, **kw)).double()
    c = kw["in_channels"]
    x = torch.rand(40, c, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x2 = torch.rand(21, c, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("NEURALPATH_FUSED", mode)
        got[mode] = npx.npk(net, x, block=16), npx.npk(net, x, x2, block=16)
    for a, b in zip(got["1"], got["0"]):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-12 * b.abs().max().item()
    assert not torch.equal(got["1"][0], got["0"][0])  # the compiled passes ran (another order of the window sums)
    assert seen and set(seen) == {bf16 == "1" and kw.get("gate") != "soft"}


def test_bf16_counts_agree_with_float32_overlaps(monkeypatch):
    """Float32, a GCONV with up to 128 channels: the kernel with the overlaps as bfloat16 counts equals the float32
    GEMMs' to float32 rounding (the float32 GEMM scales inside BLAS; the counts are exact and scaled once), and above
    256 channels the counts are not used (a count of 257 is not a bfloat16)."""
    from neuralpath.kernels import fused

    monkeypatch.setenv("NEURALPATH_FUSED", "1")
    torch.manual_seed(0)
    net = randomize_biases(npx.ConvDGN("gconv", channels=(16, 32, 128), hidden=(8,), image_size=8, tied=True))
    x = torch.rand(24, 3, 8, 8)
    got = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("NEURALPATH_BF16", mode)
        got[mode] = npx.npk(net, x, block=16)
    rel = ((got["1"] - got["0"]).abs().max() / got["0"].abs().max()).item()
    assert 0 < rel < 1e-5 or torch.equal(got["1"], got["0"]), rel
    assert fused.counts_in_bf16(256) and not fused.counts_in_bf16(257)
    monkeypatch.setenv("NEURALPATH_BF16", "0")
    assert not fused.counts_in_bf16(8)


def test_compiled_tile_passes_fall_back_with_a_warning(monkeypatch):
    """Where the compiled passes do not compile (no C++ compiler), the tensor-op loop runs, after one warning."""
    from neuralpath.kernels import fused

    def broken(*a, **k):
        raise RuntimeError("no compiler")

    net = npx.ConvDGN("gconv", in_channels=2, out_dim=3, channels=(3,), hidden=(4,), image_size=6, tied=True).double()
    x = torch.rand(20, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    monkeypatch.setenv("NEURALPATH_FUSED", "0")
    want = npx.npk(net, x, block=16)
    monkeypatch.setenv("NEURALPATH_FUSED", "1")
    monkeypatch.setattr(fused, "window", lambda *a: broken)
    monkeypatch.setattr(fused, "window_counts", lambda *a: broken)  # the bfloat16-count pass (hard gates)
    fused.window_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiled NPK tile passes unavailable"):
            got = npx.npk(net, x, block=16)
    finally:
        fused.window_ops.cache_clear()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fc_overlaps_in_bf16_give_the_same_kernel_bit_for_bit(monkeypatch, dtype):
    """Hard dense gates of a power-of-two width <= 256 take bfloat16 overlap GEMMs (g / width and every count are
    exact there): the kernel is the float one bit for bit, symmetric and rectangular. Soft gates, other widths and
    widths above 256 keep the float GEMMs."""
    from neuralpath.kernels import npk as npk_module

    torch.manual_seed(0)
    nets = {
        "hard 64": (randomize_biases(npx.FCDGN(in_dim=7, width=64, depth=4, out_dim=2, tied=True)), True),
        "hard 48": (randomize_biases(npx.FCDGN(in_dim=7, width=48, depth=3, out_dim=2, tied=True)), False),
        "hard 512": (npx.FCDGN(in_dim=7, width=512, depth=2, out_dim=2, tied=True), False),
        "soft 64": (randomize_biases(npx.FCDGN(in_dim=7, width=64, depth=3, out_dim=2, gate="soft")), False),
    }
    x, x2 = torch.randn(70, 7, dtype=dtype), torch.randn(33, 7, dtype=dtype)
    for name, (net, takes) in nets.items():
        net = net.to(dtype)
        got = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("NEURALPATH_BF16", mode)
            f = npk_module.featurize(net, x[:4])
            assert any(c is not None for c in f[2]["bf16"]) == (takes and mode == "1"), name
            got[mode] = npx.npk(net, x, block=32), npx.npk(net, x, x2, block=32)
        for a, b in zip(got["1"], got["0"]):
            assert torch.equal(a, b), name
