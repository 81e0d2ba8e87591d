"""Instruments beyond the paper: the infinite-width NPK, path norms from the NPV, gate statistics and exact linear
regions along a segment, each against an independent computation."""

import json
import math

import numpy as np
import pytest
import torch

import neuralpath as npx
from neuralpath.gatestats import class_overlap, distinct_patterns, flip_fraction, hard_gates, regions_along_segment
from neuralpath.kernels.infinite import npk_infinite
from neuralpath.pathnorm import output_bound, path_norm
from neuralpath.testing import KernelTestBase

F64 = torch.float64


def _inf_reference(x, y, depth, sb):
    """Scalar Python version of the NNGP angle recursion (independent of the vectorised code)."""
    d = len(x)
    kxy, kxx, kyy = (
        2 * float(np.dot(x, y)) / d + sb**2,
        2 * float(np.dot(x, x)) / d + sb**2,
        2 * float(np.dot(y, y)) / d + sb**2,
    )
    h = float(np.dot(x, y))
    for _ in range(depth - 1):
        c = max(-1.0, min(1.0, kxy / math.sqrt(kxx * kyy)))
        t = math.acos(c)
        h *= (math.pi - t) / (2 * math.pi)
        kxy = math.sqrt(kxx * kyy) * (math.sin(t) + (math.pi - t) * math.cos(t)) / math.pi + sb**2
        kxx, kyy = kxx + sb**2, kyy + sb**2
    return h


@pytest.mark.parametrize("sb", [0.0, 0.7])
def test_infinite_npk_matches_the_scalar_recursion_and_the_diagonal(sb):
    x = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    H = npk_infinite(x, depth=4, bias_std=sb)
    ref = torch.tensor([[_inf_reference(a.numpy(), b.numpy(), 4, sb) for b in x] for a in x], dtype=F64)
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(H[off], ref[off], rtol=1e-10, atol=1e-14)  # arccos near 1: see the module docstring
    assert torch.allclose(H.diagonal(), ref.diagonal(), rtol=1e-7)
    assert torch.allclose(npk_infinite(x, depth=4, diag=True, bias_std=sb), (x * x).sum(1) / 8, rtol=1e-15)


def test_finite_width_random_gates_converge_to_the_infinite_npk():
    """Monte-Carlo at growing width: the relative error of <x,x'> prod overlap_l / w^(d-1) falls like w^(-1/2)."""
    x = torch.rand(12, 30, dtype=F64, generator=torch.Generator().manual_seed(1))
    Hi = npk_infinite(x, depth=3)
    errs = []
    for w in (32, 2048):
        e = []
        for s in range(4):
            net = npx.FCDGN(
                in_dim=30,
                width=w,
                depth=3,
                out_dim=1,
                bias=False,
                init="gaussian",
                generator=torch.Generator().manual_seed(s),
            ).double()
            o = npx.overlaps(net, x)
            e.append((torch.linalg.norm((x @ x.T) * o[0] * o[1] / w**2 - Hi) / torch.linalg.norm(Hi)).item())
        errs.append(sum(e) / len(e))
    assert errs[1] < errs[0] / 4  # 64x the width: about 8x smaller (w^-1/2), at least 4x


def _nets():
    torch.manual_seed(0)
    nets = [
        npx.FCDGN(in_dim=5, width=4, depth=4, out_dim=3).double(),
        npx.FCDGN(in_dim=5, width=4, depth=3, out_dim=2, bias=False).double(),
        npx.ConvDGN("gconv", in_channels=2, out_dim=3, channels=(2, 3), hidden=(4,), image_size=4).double(),
        npx.ConvDGN("vconv", in_channels=2, out_dim=3, channels=(2,), hidden=(3,), image_size=3).double(),
    ]
    for n in nets:
        for m in n.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.data.normal_()
    m = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 2, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2, 2, 1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(2, 3),
        )
        .double()
        .eval()
    )
    nets.append(npx.from_module(m, torch.zeros(2, 3, 4, 4, dtype=F64)))
    return nets


@pytest.mark.parametrize("net", _nets(), ids=["fc", "fc-nobias", "gconv", "vconv", "module-maxpool"])
@pytest.mark.parametrize("q", [1.0, 2.0, 0.5])
def test_path_norm_equals_enumeration(net, q):
    v = npx.npv(net)
    assert torch.allclose(path_norm(net, q), (v.abs() ** q).sum(0), rtol=1e-10)


def test_output_bound_holds():
    net = _nets()[2]
    x = torch.rand(20, 2, 4, 4, dtype=F64)
    out, bound = output_bound(net, x)
    assert (out <= bound * (1 + 1e-12)).all() and (bound > 0).all()


def test_regions_along_a_segment_match_dense_sampling():
    torch.manual_seed(3)
    net = npx.FCDGN(in_dim=6, width=8, depth=4, out_dim=2, tied=True).double()
    for layer in net.value_layers:
        layer.bias.data.normal_(0, 0.3)
    a = 2 * torch.randn(6, dtype=F64)
    b = -a + 0.3 * torch.randn(6, dtype=F64)  # through the middle: many hyperplanes are crossed
    exact = regions_along_segment(net, a, b)
    t = torch.linspace(0, 1, 200001, dtype=F64)[:, None]
    gs = hard_gates(net, (1 - t) * a + t * b)
    pat = torch.cat(gs, 1)
    changes = int((pat[1:] != pat[:-1]).any(1).sum())
    assert exact == changes + 1 and exact > 3


def test_gate_statistics_against_brute_force():
    g1 = [torch.tensor([[1, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)]
    g2 = [torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)]
    assert flip_fraction(g1, g2) == [pytest.approx(2 / 12)]
    assert distinct_patterns(g1) == ([3], 3)
    y = torch.tensor([0, 0, 1, 1])
    M = class_overlap(g1, y)[0]
    cos = lambda a, b: float((a & b).sum()) / math.sqrt(float(a.sum()) * float(b.sum()))  # noqa: E731
    G = g1[0]
    assert M[0, 0].item() == pytest.approx(cos(G[0], G[1]))
    assert M[0, 1].item() == pytest.approx(np.mean([cos(G[i], G[j]) for i in (0, 1) for j in (2, 3)]))
    assert M[1, 1].item() == pytest.approx(cos(G[2], G[3]))


def test_reproduce_gates_quick(cli, tmp_path, mnist_root):
    r = cli("reproduce", "gates", "--epochs", "1", "--pairs", "3", "--data-root", mnist_root, "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert "| 1 |" in r.stdout and "neurons" in r.stdout
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "gates-overlap.png").read_bytes()[:4] == b"\x89PNG"


def test_nu_over_trace_is_the_least_norm_npv_that_fits_the_labels():
    """nu / trace H = y^T H^-1 y equals ||v*||^2 for v* the least-norm solution of Phi v = y, Phi from path
    enumeration (float64): what `reproduce nu` compares the trained ||v||^2 with."""
    from neuralpath.experiments.nu import nu_of

    g = torch.Generator().manual_seed(3)
    net = npx.FCDGN(in_dim=6, width=10, depth=3, out_dim=1, bias=False, tied=True, generator=g).double()
    x = torch.randn(5, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    nu, jit, tr = nu_of(net, x, y)
    phi = npx.npf(net, x)
    assert torch.linalg.matrix_rank(phi) == 5  # the labels can be fitted exactly
    v_star = torch.linalg.pinv(phi) @ y
    assert jit <= 1e-12 and torch.allclose(phi @ v_star, y, atol=1e-10)  # at most the smallest jitter tried
    assert abs(nu / tr - float(v_star @ v_star)) <= 1e-6 * float(v_star @ v_star)


def test_gates_of_an_existing_run(cli, tmp_path, mnist_root):
    """`reproduce gates --run DIR` measures a user's ReLU FC run from its epoch_K.pt snapshots; epoch 0 is the run's
    own initial network (rebuilt from its seed exactly as the engine draws it); other runs are refused."""
    from neuralpath.experiments.gates import _existing_run, initial_net
    from neuralpath.train import RunData, run_spec

    run = tmp_path / "run"
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--limit-train", "500", "--limit-test", "200",
              "--width", "16", "--depth", "3", "--epochs", "2", "--seed", "3"]  # fmt: skip
    r = cli("train", *common, "--save-every", "1", "--out", run)
    assert r.returncode == 0, r.stderr[-500:]
    rc, snaps = _existing_run(run)
    assert [e for e, _ in snaps] == [1, 2]
    x = torch.zeros(10, 1, 28, 28)
    data = RunData(x, torch.arange(10), x, torch.arange(10))  # 10 classes, as MNIST
    engine_net = run_spec(rc, data).net
    ours = initial_net(rc, (1, 28, 28))
    for a, b in zip(engine_net.state_dict().values(), ours.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    r = cli("reproduce", "gates", "--run", run, "--pairs", "2", "--data-root", mnist_root, "--out", tmp_path / "g")
    assert r.returncode == 0, r.stderr[-800:]
    assert "ReLU FC 3x16 on mnist" in r.stdout and "| 2 |" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "g" / "gates.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in recs if not x.get("anchor")] == [0, 1, 2]
    other = tmp_path / "dl"
    assert cli("train", *common, "--regime", "dlnpf", "--out", other).returncode == 0
    bad = cli("reproduce", "gates", "--run", other, "--out", tmp_path / "g2")
    assert bad.returncode == 1 and "ReLU FC runs" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("reproduce", "gates", "--run", tmp_path / "nope", "--out", tmp_path / "g3")
    assert bad.returncode == 1 and "not a run folder" in bad.stderr


class TestInfiniteNPKBattery(KernelTestBase):
    """The infinite-width NPK of random ReLU gates through the shared kernel battery ("net" is its depth and bias
    scale: the kernel has no finite network)."""

    def kernel(self, net, x1, x2=None, **kw):
        depth, bias_std = net
        return npk_infinite(x1, x2, depth=depth, bias_std=bias_std, **kw)

    def cases(self):
        g = torch.Generator().manual_seed(7)
        x1 = torch.randn(9, 5, generator=g, dtype=torch.float64)
        x2 = torch.randn(6, 5, generator=g, dtype=torch.float64)
        return [((3, 0.0), x1, x2), ((5, 0.3), x1, x2)]


def test_gates_of_a_run_on_other_inputs_than_mnist(cli, tmp_path):
    """Session 10: `reproduce gates --run` of an FC run on another input size (synthetic here; an FC run on CIFAR-10
    likewise) measured every epoch and then failed in the Hanin-Rolnick anchor, whose nets assumed 784 inputs."""
    run = tmp_path / "syn"
    r = cli("train", "--dataset", "synthetic", "--width", "8", "--depth", "3", "--epochs", "1", "--save-every", "1",
            "--limit-train", "100", "--out", run)  # fmt: skip
    assert r.returncode == 0, r.stderr[-500:]
    r = cli("reproduce", "gates", "--run", run, "--pairs", "1", "--out", tmp_path / "g")
    assert r.returncode == 0, r.stderr[-800:]
    recs = [json.loads(x) for x in (tmp_path / "g" / "gates.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in recs if not x.get("anchor")] == [0, 1] and any(x.get("anchor") for x in recs)
