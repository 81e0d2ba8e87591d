"""nu_t = y^T (H_t / trace H_t)^(-1) y during training (arXiv 2006.10529; docs/THEORY.md §5): binary MNIST
4 (-1) vs 7 (+1).

Bias-free ReLU FC, width 100, d = 6, every weight +-sqrt(2/w) with probability 1/2 (w = 100, also in the first
and last layer, as the setup states), one output, MSE, RMSprop lr 1e-4 with Keras' defaults (rho 0.9, eps 1e-7),
batch 64; the runs train as one stack of the training engine. At initialisation and every 2 epochs, on exactly
100 + 100 examples drawn from the training subset: H_t is the NPK of the current gates, H = (X X^T) ⊙ prod_l (A_l A_l^T)
(``neuralpath.npk``, float64), and nu_t is computed by a Cholesky solve (``kernels.machines.quadratic_form_inverse``,
adaptive jitter recorded per point). The paper's claim: nu_t falls as the gates learn (the NPK aligns with y).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import datasets
from ..errors import NeuralpathError
from ..io import read_jsonl
from ..kernels.machines import quadratic_form_inverse
from ..kernels.npk import npk
from ..pathnorm import output_bound, path_norm
from ..runfolder import RunFolder
from ..train import FitOptions, RunData, RunSpec, fit
from .common import (
    Env,
    add,
    budget_settings,
    done_keys,
    mean_std,
    mnist_or_synthetic,
    publish,
    savefig,
    seeded_fc,
    subplots,
)

BUDGETS = {"quick": dict(runs=2, epochs=10, limit=4000), "paper": dict(runs=5, epochs=50, limit=None)}
EVERY = 2  # nu_t every 2 epochs (the authors' snapshots), and at initialisation


def _binary(x, y):
    m = (y == 4) | (y == 7)
    return x[m], torch.where(y[m] == 7, 1.0, -1.0)


def make_net(seed, width=100, depth=6):
    """Bias-free tied ReLU FC, one output, every weight +-sqrt(2/w) with probability 1/2 (also the first and last
    layer, as the setup states)."""
    net = seeded_fc(width, depth, 1, seed, bias=False, tied=True, init="bernoulli", init_scale=1.0)
    s = math.sqrt(2.0 / width)
    with torch.no_grad():
        for layer in net.value_layers:
            layer.weight.copy_(layer.weight.sign() * s)
    return net


def nu_of(net, x, y):
    """(nu, jitter, trace H) for inputs x (n, 784) and labels y in {-1, +1}: nu = y^T (H / trace H)^-1 y, H the NPK
    in float64. y^T H^-1 y = nu / trace H is the squared 2-norm of the smallest NPV that fits y on x with these
    gates (yhat = <phi, v>: the least-norm solution of Phi v = y)."""
    H = npk(net, x.double(), dtype=torch.float64)
    tr = float(H.diagonal().sum())
    nu, jit = quadratic_form_inverse(H / tr, y.double())
    return nu, jit, tr


def _measure(net, x, y) -> dict:
    """nu_t, its jitter and trace H; ||v||_2^2 (y^T H^-1 y = nu / trace H is the smallest that fits); and how much of
    the Cauchy-Schwarz bound |yhat(x)| <= sqrt(H(x, x)) ||v||_2 the network uses (largest ratio over the points)."""
    nu, jit, trh = nu_of(net, x, y)
    out, bound = output_bound(net, x)
    return {
        "nu": nu,
        "jitter": jit,
        "trace_h": trh,
        "v_norm2": float(path_norm(net, 2.0)[0]),
        "bound_tightness": float((out / bound).max()),
    }


def eval_points(y01, n_per_class=100, seed=0):
    """Exactly ``n_per_class`` indices of each class (seeded), sorted."""
    g = np.random.default_rng(seed)
    idx = np.concatenate([g.choice(np.flatnonzero(y01 == c), n_per_class, replace=False) for c in (0, 1)])
    return torch.from_numpy(np.sort(idx))


def run(out, budget="quick", runs=None, epochs=None, env: Env | None = None) -> str:
    """Train ``runs`` nets as one stack (MSE, Keras' RMSprop), nu_t every 2 epochs; records, report, plot."""
    env = env or Env()
    b = budget_settings(BUDGETS, budget, runs=runs, epochs=epochs)
    runs, epochs = b["runs"], b["epochs"]
    if epochs < EVERY:
        raise NeuralpathError(f"--epochs {epochs}: nu_t is measured every {EVERY} epochs; give at least {EVERY}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, label = mnist_or_synthetic("train", env.data_root)
    if not label.startswith("MNIST"):
        y = torch.where(y % 2 == 0, torch.tensor(4), torch.tensor(7))
    x, yb = _binary(x.flatten(1), y)
    ylab = (yb > 0).long().numpy()
    tr = (
        torch.from_numpy(datasets.stratified_indices(ylab, min(b["limit"], len(ylab)), seed=1))
        if b["limit"]
        else torch.arange(len(ylab))
    )
    ev = tr[eval_points(ylab[tr.numpy()])]  # 100 + 100 points of the training subset
    xt, yt = _binary(*mnist_or_synthetic("test", env.data_root)[:2])
    data = RunData(x, yb, xt.flatten(1), yt, label)
    rec_path = out / "nu.jsonl"
    have = done_keys(rec_path, lambda r: (r["run"], r["epoch"]))
    t0 = time.time()
    specs = []
    for r in range(runs):
        net = make_net(r)
        if (r, 0) not in have:
            add(rec_path, {"run": r, "epoch": 0, **_measure(net, x[ev], yb[ev])})
        specs.append(
            RunSpec(
                net=net,
                seed=r,
                train_idx=tr,
                folder=RunFolder(out / "runs" / f"run{r}"),
                config={"experiment": "nu", "run": r, "epochs": epochs, "budget": budget, "n_train": len(tr)},
                label=f"nu run {r}",
            )
        )

    def measure(epoch, nets):
        if epoch % EVERY:
            return None
        recs = []
        for r, net in enumerate(nets):
            rec = _measure(net, x[ev].to(next(net.parameters()).device), yb[ev])
            if (r, epoch) not in have:
                add(rec_path, {"run": r, "epoch": epoch, **rec})
            recs.append(rec)
        return recs

    opts = FitOptions(optimizer="rmsprop", lr=1e-4, epochs=epochs, batch_size=64, loss="mse", device=env.device)
    state = out / "runs" / "stack.pt"
    if not all(RunFolder(s.folder.path).finished for s in specs):
        fit(specs, data, opts, state_path=state, resume=True, progress=env.progress, log=env.log, on_epoch=measure)
    recs = read_jsonl(rec_path)
    md = report(recs, runs, epochs, budget, len(tr), label)
    return publish(out, "nu", md, t0, rec_path, lambda png: plot(recs, runs, epochs, png))


def series(recs, runs, epochs):
    out = []
    for e in sorted({r["epoch"] for r in recs if r["epoch"] <= epochs}):
        vs = [r for r in recs if r["epoch"] == e and r["run"] < runs]
        m, s = mean_std([r["nu"] for r in vs])
        # ||v||^2 against y^T H^-1 y = nu / trace H (records without trace_h predate the fix: no ratio)
        ratio = mean_std([r["v_norm2"] * r["trace_h"] / r["nu"] for r in vs if "trace_h" in r])[0]
        tight = [r["bound_tightness"] for r in vs if "bound_tightness" in r]
        out.append((e, m, s, max(r["jitter"] for r in vs), len(vs), ratio, max(tight) if tight else None))
    return out


def report(recs, runs, epochs, budget, n_train, label) -> str:
    lines = [
        f"# nu_t on binary MNIST 4 vs 7 (budget `{budget}`: {runs} runs, {epochs} epochs, "
        f"{n_train} training images; data: {label})",
        "",
        "nu_t = y^T (H_t/trace H_t)^(-1) y on 100 + 100 training examples; the paper: nu_t falls during "
        "training. Mean ± population std over runs.",
        "",
        "||v||^2 / (y^T H^-1 y): the squared path norm (NPV 2-norm) of the network against y^T H^-1 y = nu / trace H, "
        "the squared norm of the "
        "smallest NPV that fits the labels with the same gates on those points. Above 1: the trained NPV is "
        "longer than that least-norm interpolant; the trained net does not interpolate these labels exactly (MSE "
        "on the whole training subset), so the ratio is not bounded below by 1.",
        "",
        "Bound: the largest |yhat(x)| / (sqrt(H(x, x)) ||v||_2) over the 200 points and the runs (Cauchy-Schwarz "
        "on yhat = <phi_x, v>: at most 1; how much of the bound the network uses).",
        "",
        "| epoch | nu mean | nu std | max jitter | runs | ‖v‖² / (yᵀH⁻¹y) (mean) | bound used (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    ser = series(recs, runs, epochs)
    for e, m, s, j, n, ratio, tight in ser:
        lines.append(
            f"| {e} | {m:.4g} | {s:.3g} | {j:g} | {n} | {'—' if ratio is None else f'{ratio:.3g}'} | "
            f"{'—' if tight is None else f'{tight:.2e}'} |"
        )
    if len(ser) >= 2:
        lines += [
            "",
            f"nu_t changed from {ser[0][1]:.4g} (epoch 0) to {ser[-1][1]:.4g} (epoch {ser[-1][0]}): "
            f"{'lower' if ser[-1][1] < ser[0][1] else 'NOT lower'} at the end"
            + (", falling at every measurement" if all(b[1] < a[1] for a, b in zip(ser, ser[1:])) else "")
            + ".",
        ]
    return "\n".join(lines) + "\n"


def plot(recs, runs, epochs, path):
    ser = series(recs, runs, epochs)
    if not ser:
        return
    fig, ax = subplots(figsize=(5.5, 3.8))
    e_, m_, s_ = [a[0] for a in ser], [a[1] for a in ser], [a[2] for a in ser]  # (epoch, mean, std, ...)
    ax.plot(e_, m_, "o-", label=f"mean over {runs} runs")
    ax.fill_between(e_, [a - c for a, c in zip(m_, s_)], [a + c for a, c in zip(m_, s_)], alpha=0.3, label="± std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nu_t = y^T Ĥ^-1 y")
    ax.set_yscale("log")
    ax.set_title("nu_t, binary MNIST 4 vs 7")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, path)
