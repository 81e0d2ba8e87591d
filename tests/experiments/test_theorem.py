import math

import numpy as np
import pytest
import torch

import neuralpath as npx
from neuralpath.experiments import theorem


@pytest.mark.parametrize("init", ["bernoulli", "gaussian"])
def test_expected_value_ntk_is_d_sigma_pow_H(init):
    """Theorem 5.1 at finite width: E[K^v] = d sigma^(2(d-1)) H for gates independent of the value weights."""
    torch.manual_seed(0)
    w, d = 6, 3
    net = theorem._gated_net(w, d, seed=1, in_dim=4)
    x = torch.randn(5, 4, dtype=torch.float64)
    H = npx.npk(net, x)
    errs, acc, done = [], torch.zeros_like(H), 0
    for target in (50, 3200):
        while done < target:
            sigma = theorem._draw_value(net, w, init, seed=done)
            acc += npx.ntk(net, x, params="value")
            done += 1
        errs.append(theorem.rel_err(acc / done / (d * sigma ** (2 * (d - 1))), H))
    assert errs[1] < errs[0] / 3  # Monte-Carlo error falls like draws^(-1/2) (8x fewer -> ~1/8 ... 1/3 allowed)
    assert errs[1] < 0.05


def test_one_draw_error_falls_with_width():
    x = torch.randn(8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for w in (16, 256):
        e = []
        for s in range(3):
            net = theorem._gated_net(w, 3, seed=s, in_dim=20)
            sigma = theorem._draw_value(net, w, "bernoulli", seed=100 + s)
            e.append(theorem.rel_err(npx.ntk(net, x) / (3 * sigma**4), npx.npk(net, x)))
        errs.append(np.mean(e))
    slope = math.log(errs[1] / errs[0]) / math.log(16)
    assert -0.8 < slope < -0.3


@pytest.mark.slow
def test_reproduce_theorem_cli(cli, tmp_path):
    r = cli("reproduce", "theorem", "--out", tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "theorem.png").exists() and (tmp_path / "theorem.jsonl").exists()


def test_kernel_cli(cli, tmp_path, mnist_root):
    out = tmp_path / "k.npy"
    r = cli(
        "kernel",
        "npk",
        "--arch",
        "fc",
        "--width",
        "16",
        "--depth",
        "3",
        "--n",
        "50",
        "--data-root",
        mnist_root,
        "--out",
        out,
        "--block",
        "16",
        "--dtype",
        "float64",
    )
    assert r.returncode == 0, r.stderr
    K = np.load(out)
    x, _ = npx.datasets.load("mnist", "train", root=mnist_root, limit=50)
    from neuralpath.regimes import build_regime

    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28), width=16, depth=3)
    assert np.allclose(K, npx.npk(net.double(), x.double()).numpy(), rtol=1e-10)
    r = cli(
        "kernel",
        "ntk",
        "--arch",
        "fc",
        "--width",
        "16",
        "--depth",
        "3",
        "--n",
        "20",
        "--data-root",
        mnist_root,
        "--out",
        tmp_path / "t.npy",
    )
    assert r.returncode == 0, r.stderr and np.load(tmp_path / "t.npy").shape == (20, 20)
