"""The NTK split during decoupled learning (arXiv 2006.10529, experiments; docs/THEORY.md §4): K = K^v + K^f for
DLNPF, FC 6x128 on MNIST, SGD 1e-2.

Every 5 epochs (and at initialisation), on 200 training images (exactly 20 per class): trace and Frobenius norm of the
value part K^v and the feature part K^f of the empirical NTK of the logits (the authors' notebook differentiated the
summed softmax, identically 1: zero gradients), and the kernel-target alignment of K^v, K^f and K with the one-hot
labels. The network is trained by ``train.train`` with checkpoints every 5 epochs; the kernels are computed from
them afterwards (structured NTK, float64), so the training itself is the same as any DLNPF run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoints, datasets
from ..errors import NeuralpathError, check_choice
from ..io import read_jsonl
from ..kernels.machines import alignment
from ..kernels.ntk import ntk
from ..regimes import build_regime
from ..train import TrainConfig, net_kwargs, train
from .common import Env, add, done_keys, publish, savefig, subplots

BUDGETS = {"quick": dict(epochs=10, limit_train=6000), "paper": dict(epochs=60, limit_train=None)}


def per_class(y, k=20, seed=0):
    """Exactly ``k`` indices of every class (seeded), sorted."""
    g = np.random.default_rng(seed)
    y = np.asarray(y)
    return np.sort(np.concatenate([g.choice(np.flatnonzero(y == c), k, replace=False) for c in np.unique(y)]))


def run(out, budget="quick", epochs=None, every=5, seed=0, env: Env | None = None) -> str:
    env = env or Env()
    check_choice("budget", budget, tuple(BUDGETS))
    b = BUDGETS[budget]
    epochs = b["epochs"] if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < every:
        raise NeuralpathError(
            f"--epochs {epochs!r}: the kernels are measured every {every} epochs; give at least " f"{every}"
        )
    out = Path(out)
    cfg = TrainConfig(
        arch="fc",
        regime="dlnpf",
        optimizer="sgd",
        lr=1e-2,
        epochs=epochs,
        seed=seed,
        limit_train=b["limit_train"],
        save_every=every,
        data_root=env.data_root,
        device=env.device,
    )
    t0 = time.time()
    env.log(f"training DLNPF FC 6x128 (SGD 1e-2, {epochs} epochs) into {out / 'run'}")
    res = train(cfg, out / "run", resume=True, progress=env.progress)
    xa, ya = datasets.load("mnist", "train", root=env.data_root)
    sel = torch.from_numpy(per_class(ya.numpy(), 20, seed=0))  # exactly 20 per class
    x, y = xa[sel], ya[sel]
    rec_path = out / "ntk_split.jsonl"
    have = done_keys(rec_path, lambda r: r["epoch"])
    stages = [0] + list(range(every, epochs + 1, every))
    for ep in stages:
        if ep in have:
            continue
        net, _ = build_regime("dlnpf", "fc", seed, None, **net_kwargs(cfg.resolved(), x.shape[1:], 10))
        net.cpu()
        if ep > 0:
            net.load_state_dict(checkpoints.load(out / "run" / f"epoch_{ep}.pt")["model"])
        net = net.double()
        xd = x.double()
        rec: dict[str, Any] = {"epoch": ep, "n": len(y)}
        for suffix, biases in (("", True), ("_w", False)):  # weights and biases; weights only (the authors')
            kv = ntk(net, xd, params="value", biases=biases)
            kf = ntk(net, xd, params="feature", biases=biases)
            for name, K in (("value", kv), ("feature", kf), ("all", kv + kf)):
                rec[f"trace_{name}{suffix}"] = float(K.diagonal().sum())
                rec[f"fro_{name}{suffix}"] = float(K.norm())
                rec[f"align_{name}{suffix}"] = alignment(K, y)
        add(rec_path, rec)
        env.log(
            f"epoch {ep}: trace K^v {rec['trace_value']:.4g}, K^f {rec['trace_feature']:.4g}; alignment "
            f"K^v {rec['align_value']:.3f}, K^f {rec['align_feature']:.3f}"
        )
    recs = sorted((r for r in read_jsonl(rec_path) if r["epoch"] in stages), key=lambda r: r["epoch"])
    md = report(recs, budget, epochs, b["limit_train"], seed, res["best_test_acc"])
    return publish(out, "ntk_split", md, t0, rec_path, lambda png: plot(recs, png))


_HEADER = [
    "| epoch | tr K^v | tr K^f | ‖K^v‖_F | ‖K^f‖_F | align K^v | align K^f | align K |",
    "|---|---|---|---|---|---|---|---|",
]


def _rows(recs, sfx=""):
    return [
        f"| {r['epoch']} | {r['trace_value' + sfx]:.4g} | {r['trace_feature' + sfx]:.4g} | "
        f"{r['fro_value' + sfx]:.4g} | {r['fro_feature' + sfx]:.4g} | {r['align_value' + sfx]:.3f} | "
        f"{r['align_feature' + sfx]:.3f} | {r['align_all' + sfx]:.3f} |"
        for r in recs
    ]


def report(recs, budget, epochs, limit_train, seed, best_test_acc) -> str:
    """The markdown tables from the per-epoch records (weights and biases; weights only where measured)."""
    lines = [
        f"# NTK split during DLNPF training (budget `{budget}`: {epochs} epochs, "
        f"{'full MNIST' if not limit_train else str(limit_train) + ' training images'}, seed {seed}; "
        f"best test accuracy {100 * best_test_acc:.2f}%)",
        "",
        "K^v: NTK w.r.t. the value network; K^f: w.r.t. the (soft-gated) feature network; 200 MNIST training images, "
        "logits, traced over the 10 outputs. align = kernel-target alignment with one-hot labels.",
        "",
        *_HEADER,
        *_rows(recs),
    ]
    if recs and "trace_value_w" in recs[0]:
        lines += ["", "Weights only (the authors' setting: no derivatives w.r.t. the biases):", "", *_HEADER]
        lines += _rows(recs, "_w")
    return "\n".join(lines) + "\n"


def plot(recs, path):
    """Trace, Frobenius norm and label alignment of K^v and K^f against the epoch (PNG)."""
    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    e = [r["epoch"] for r in recs]
    for ax, key, title in (
        (axes[0], "trace", "trace"),
        (axes[1], "fro", "Frobenius norm"),
        (axes[2], "align", "alignment"),
    ):
        for part, style in (("value", "o-"), ("feature", "s-")):
            ax.plot(e, [r[f"{key}_{part}"] for r in recs], style, label=f"K^{part[0]}")
        if key != "align":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DLNPF FC 6x128, MNIST, SGD 1e-2: value and feature parts of the NTK")
    fig.tight_layout()
    savefig(fig, path)
