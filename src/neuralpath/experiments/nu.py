"""nu_t = y^T (H_t / trace H_t)^(-1) y during training (SPEC §5): binary MNIST 4 (-1) vs 7 (+1).

Bias-free ReLU FC, width 100, d = 6, every weight +-sqrt(2/w) with probability 1/2 (w = 100, also in the first
and last layer, as the setup states), one output, MSE, RMSprop lr 1e-4, batch 64. Every 2 epochs, on 200 training
examples (100 per class): H_t is the NPK of the current gates, H = (X X^T) ⊙ prod_l (A_l A_l^T)
(``neuralpath.npk``, float64), and nu_t is computed by a Cholesky solve (``kernels.machines.quadratic_form_inverse``,
adaptive jitter recorded per point). The paper's claim: nu_t falls as the gates learn (the NPK aligns with y).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import datasets
from ..errors import check_choice
from ..io import write_text
from ..kernels.machines import quadratic_form_inverse
from ..kernels.npk import npk
from ..nets import FCDGN
from .common import add, done_keys, mean_std, mnist_or_synthetic, pyplot, savefig

BUDGETS = {"quick": dict(runs=2, epochs=10, limit=4000), "paper": dict(runs=5, epochs=50, limit=None)}


def _binary(x, y):
    m = (y == 4) | (y == 7)
    return x[m], torch.where(y[m] == 7, 1.0, -1.0)


def make_net(seed, width=100, depth=6):
    net = FCDGN(in_dim=784, width=width, depth=depth, out_dim=1, bias=False, tied=True)
    g = torch.Generator().manual_seed(seed)
    s = math.sqrt(2.0 / width)
    with torch.no_grad():
        for layer in net.value_layers:
            layer.weight.copy_((torch.randint(0, 2, layer.weight.shape, generator=g) * 2 - 1).float() * s)
    return net


def nu_of(net, x, y):
    """(nu, jitter) for inputs x (n, 784) and labels y in {-1, +1}."""
    H = npk(net.double(), x.double())
    net.float()
    Hn = H / H.diagonal().sum()
    return quadratic_form_inverse(Hn, y.double())


def run(out, budget="quick", runs=None, epochs=None, data_root=None, progress=None, log=print) -> str:
    from tqdm import tqdm
    check_choice("budget", budget, tuple(BUDGETS))
    b = BUDGETS[budget]
    runs, epochs = runs or b["runs"], epochs or b["epochs"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, label = mnist_or_synthetic("train", data_root)
    if not label.startswith("MNIST"):
        x, y = x, torch.where(y % 2 == 0, torch.tensor(4), torch.tensor(7))
    x, yb = _binary(x.flatten(1), y)
    ylab = (yb > 0).long()
    ev = torch.from_numpy(datasets.stratified_indices(ylab.numpy(), 200, seed=0))
    xe, ye = x[ev], yb[ev]
    if b["limit"]:
        tr = torch.from_numpy(datasets.stratified_indices(ylab.numpy(), min(b["limit"], len(ylab)), seed=1))
        xt, yt = x[tr], yb[tr]
    else:
        xt, yt = x, yb
    rec_path = out / "nu.jsonl"
    have = done_keys(rec_path, lambda r: (r["run"], r["epoch"]))
    t0 = time.time()
    for r in range(runs):
        if all((r, e) in have for e in range(0, epochs + 1, 2)):
            continue
        torch.manual_seed(r)
        net = make_net(r)
        opt = torch.optim.RMSprop(net.parameters(), lr=1e-4)
        # a partly recorded run is redone from the start (runs are minutes): records are keyed by (run, epoch)
        bar = tqdm(range(epochs + 1), desc=f"nu run {r}", leave=False, disable=None if progress is None else not progress)
        for ep in bar:
            if ep > 0:
                perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(1000 * r + ep))
                for i in range(0, len(yt), 64):
                    idx = perm[i:i + 64]
                    loss = ((net(xt[idx])[:, 0] - yt[idx]) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if ep % 2 == 0 and (r, ep) not in have:
                with torch.no_grad():
                    mse = ((net(xt[:2000])[:, 0] - yt[:2000]) ** 2).mean().item()
                nu, jit = nu_of(net, xe, ye)
                add(rec_path, {"run": r, "epoch": ep, "nu": nu, "jitter": jit, "train_mse": mse})
                bar.set_postfix(nu=f"{nu:.3g}")
    from ..io import read_jsonl
    recs = read_jsonl(rec_path)
    eps = sorted({rr["epoch"] for rr in recs if rr["epoch"] <= epochs})
    lines = [f"# nu_t on binary MNIST 4 vs 7 (budget `{budget}`: {runs} runs, {epochs} epochs, "
             f"{len(yt)} training images; data: {label})", "",
             "nu_t = y^T (H_t/trace H_t)^(-1) y on 200 training examples; the paper: nu_t falls during training.", "",
             "| epoch | nu mean | nu std | max jitter | runs |", "|---|---|---|---|---|"]
    series = []
    for e in eps:
        vs = [rr["nu"] for rr in recs if rr["epoch"] == e and rr["run"] < runs]
        m, s = mean_std(vs)
        series.append((e, m, s))
        jit = max(rr["jitter"] for rr in recs if rr["epoch"] == e and rr["run"] < runs)
        lines.append(f"| {e} | {m:.4g} | {s:.3g} | {jit:g} | {len(vs)} |")
    if len(series) >= 2:
        lines += ["", f"nu_t changed from {series[0][1]:.4g} (epoch 0) to {series[-1][1]:.4g} (epoch {series[-1][0]}): "
                  f"{'falling, as the paper says' if series[-1][1] < series[0][1] else 'NOT falling'}."]
    lines.append(f"\nWall time of this invocation: {time.time() - t0:.0f} s. Records: {rec_path}; plot: {out / 'nu.png'}")
    md = "\n".join(lines) + "\n"
    write_text(out / "nu.md", md)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    e_, m_, s_ = zip(*series)
    ax.plot(e_, m_, "o-", label="mean over runs")
    ax.fill_between(e_, [a - c for a, c in zip(m_, s_)], [a + c for a, c in zip(m_, s_)], alpha=0.3, label="± std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nu_t = y^T Ĥ^-1 y")
    ax.set_yscale("log")
    ax.set_title("nu_t, binary MNIST 4 vs 7")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, out / "nu.png")
    return md
