"""Kernel machines' numerics, bad inputs named clearly, and sweeps that survive kills and each other."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO

import neuralpath as npx
from neuralpath.errors import NeuralpathError
from neuralpath.kernels import machines


# -- kernel machines ------------------------------------------------------------------------------------
def test_cholesky_jitter_is_adaptive_and_reported():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 5, generator=g, dtype=torch.float64)
    K = a @ a.T  # rank 5: singular
    L, j = machines.cholesky(K)
    assert j > 0 and torch.allclose(L @ L.T, K + j * K.diagonal().mean() * torch.eye(30), atol=1e-10)
    L0, j0 = machines.cholesky(K + torch.eye(30))
    assert j0 == 0.0
    with pytest.raises(NeuralpathError, match="not positive definite even with jitter"):
        machines.cholesky(-torch.eye(4, dtype=torch.float64))
    with pytest.raises(NeuralpathError, match="NaN or inf"):
        machines.cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(NeuralpathError, match="square"):
        machines.cholesky(torch.ones(3, 4))


def test_quadratic_form_and_solve_match_numpy():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 40, generator=g, dtype=torch.float64)
    K = a @ a.T
    y = torch.randn(20, generator=g, dtype=torch.float64)
    q, j = machines.quadratic_form_inverse(K, y)
    assert j == 0.0 and q == pytest.approx(float(y @ np.linalg.solve(K.numpy(), y.numpy())), rel=1e-9)
    X, _ = machines.psd_solve(K, torch.stack([y, 2 * y], 1))
    np.testing.assert_allclose(X.numpy(), np.linalg.solve(K.numpy(), np.stack([y, 2 * y], 1)), rtol=1e-8)


def test_kernel_ridge_equals_closed_form_and_learns():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 4, generator=g, dtype=torch.float64)
    K = x @ x.T + 1.0
    m = machines.KernelRidge(lam=1e-2).fit(K[:60, :60], y[:60])
    Y = torch.nn.functional.one_hot(y[:60], 3).double()
    ref = np.linalg.solve(K[:60, :60].numpy() + 1e-2 * K.diagonal()[:60].mean().item() * np.eye(60), Y.numpy())
    np.testing.assert_allclose(m.alpha.numpy(), ref, rtol=1e-7, atol=1e-9)
    assert machines.accuracy(m.predict(K[60:, :60]), y[60:]) > 0.9
    auto = machines.KernelRidge().fit(K[:60, :60], y[:60])
    assert auto.lam in auto.lams
    pred = machines.svm(K[:60, :60], y[:60], K[60:, :60])
    assert machines.accuracy(pred, y[60:]) > 0.9
    ideal = (y[:, None] == y[None, :]).double()
    assert machines.alignment(ideal, y) == pytest.approx(1.0)
    assert machines.alignment(K, y) < 1.0


def test_npk_kernel_machine_on_mnist_beats_chance(mnist_root, cli, tmp_path):
    r = cli(
        "kernel",
        "fit",
        "--n-train",
        "600",
        "--n-test",
        "300",
        "--data-root",
        mnist_root,
        "--out",
        tmp_path / "fit.jsonl",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "fit.jsonl").read_text().splitlines()[0])
    assert rec["test_acc"] > 0.7 and "NPK + KRR" in r.stdout  # random-gate NPK on 600 images: far above 10%


# -- bad inputs: each names the argument, the value and what is accepted -----------------------------------
BAD = [
    (lambda: npx.FCDGN(width=0), "width=0"),
    (lambda: npx.FCDGN(depth=1), "depth=1"),
    (lambda: npx.FCDGN(gate="relu"), "gate='relu'"),
    (lambda: npx.ConvDGN("resnet", in_channels=1, out_dim=2), "arch='resnet'"),
    (lambda: npx.npk(npx.FCDGN(in_dim=4, width=3, depth=3), torch.rand(2, 5)), "in_dim=4"),
    (lambda: npx.FCDGN(in_dim=4, width=3, depth=3)(torch.rand(2, 4).double()), "dtype"),
    (lambda: npx.npk(npx.FCDGN(in_dim=4, width=3, depth=3), torch.tensor([[1.0, float("inf"), 0, 0]])), "NaN or inf"),
    (lambda: npx.ntk(npx.FCDGN(in_dim=4, width=3, depth=3), torch.rand(2, 4), params="bias"), "params='bias'"),
    (lambda: npx.ntk(npx.FCDGN(in_dim=4, width=3, depth=3), torch.rand(2, 4), method="fast"), "method='fast'"),
    (lambda: npx.datasets.load("imagenet"), "imagenet"),
    (lambda: npx.datasets.load("mnist", "validation"), "validation"),
    (lambda: npx.npk(npx.FCDGN(in_dim=4, width=3, depth=3), torch.rand(200_000, 4)), "GiB"),
    (lambda: npx.npf(npx.FCDGN(in_dim=30, width=64, depth=6), torch.rand(2, 30)), "paths"),
    (lambda: machines.fit_predict("lasso", torch.eye(2), [0, 1], torch.eye(2)), "method='lasso'"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_is_a_clear_error(i):
    fn, needle = BAD[i]
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as e:
        fn()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg.strip(), msg


CLI_BAD = [
    (["train", "--regime", "relu2", "--out", "X"], "regime"),
    (["train", "--arch", "mlp", "--out", "X"], "arch"),
    (["train", "--width", "-3", "--out", "X"], "width"),
    (["kernel", "ntk", "--params", "weights", "--num-inputs", "4", "--out", "X.npy"], "params"),
    (["kernel", "fit", "--kernel", "rbf"], "kernel"),
    (["reproduce", "table", "--budget", "huge"], "budget"),
    (["reproduce", "nu", "--budget", "huge"], "budget"),
    (["reproduce", "continuous", "--arch", "mlp"], "arch"),
    (["data", "fetch", "imagenet"], "data set NAME='imagenet'"),  # the argument named, not a --dataset flag
]


@pytest.mark.parametrize("i", range(len(CLI_BAD)))
def test_cli_bad_input_one_line_no_traceback(i, cli, tmp_path):
    args, needle = CLI_BAD[i]
    args = [str(tmp_path / a) if a in ("X", "X.npy") else a for a in args]
    r = cli(*args)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


# -- sweeps: kill, restart, two at once --------------------------------------------------------------------
SWEEP = [
    "reproduce",
    "table",
    "--rows",
    "fc-sgd",
    "--epochs",
    "4",  # the kill below lands within 10 ms of epoch 1 of 4: three epochs of margin on a fast CPU
    "--seeds",
    "2",
    "--limit-train",
    "2000",
    "--limit-test",
    "500",
]


def _sweep(out, root):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "neuralpath", *SWEEP, "--data-root", str(root), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_sweep_killed_then_restarted_and_two_sweeps_at_once(mnist_root, tmp_path):
    ref = tmp_path / "ref"
    p = _sweep(ref, mnist_root)
    assert p.wait(600) == 0, p.stderr.read()
    ref_recs = {(r["regime"], r["seed"]): r for r in map(json.loads, (ref / "runs.jsonl").read_text().splitlines())}
    # kill a sweep in the middle of phase 1, then start two sweeps on that folder at once
    out = tmp_path / "k"
    p = _sweep(out, mnist_root)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "runs" / "fc-sgd").glob("relu-s0/metrics.jsonl")):
        time.sleep(0.05)
    while time.time() < deadline and not (out / "runs" / "fc-sgd" / "relu-s0" / "metrics.jsonl").read_text():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "runs" / "fc-sgd" / "relu-s0" / "result.json").exists()
    a, b = _sweep(out, mnist_root), _sweep(out, mnist_root)
    assert a.wait(600) == 0 and b.wait(600) == 0, (a.stderr.read(), b.stderr.read())
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and len({(r["regime"], r["seed"]) for r in recs}) == 10
    for r in recs:  # the killed-and-resumed sweep gives the uninterrupted sweep's numbers
        assert r["best_test_acc"] == ref_recs[(r["regime"], r["seed"])]["best_test_acc"]
    for m in (out / "runs" / "fc-sgd").glob("*/metrics.jsonl"):
        assert [json.loads(x)["epoch"] for x in m.read_text().splitlines()] == [1, 2, 3, 4]
