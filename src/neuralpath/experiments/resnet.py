"""Beyond the paper: how much of what a ResNet learns is in its gates (arXiv 2110.03403 treats skip connections).

A small CIFAR ResNet (``neuralpath.nets.resnet``: width 16, one basic block per stage, identity and projection
shortcuts, no batch norm) on CIFAR-10 (the JPEG copy here) in three regimes of the paper, 3 seeds, trained as stacks
of the engine: ReLU (the ResNet itself), FRNPF-II (random frozen gates, a fresh value network) and FLNPF (the trained
ResNet's gates frozen at its best epoch, a fresh, independently initialised value network). Then kernel ridge
regression on the closed-form NPK of the ResNet's gates (docs/THEORY.md §7: the identity paths and the blocks'
paths add) at initialisation and after training.

compute (:func:`run`) -> records (``resnet.jsonl``) -> report (:func:`report`) -> plot (:func:`plot`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import checkpoints, datasets
from ..io import append_jsonl, read_jsonl
from ..regimes import build_regime
from ..train import TrainConfig, net_kwargs, train_many
from . import common
from .common import Env, budget_settings, krr_on_npk, mean_std, present, publish, run_record

BUDGETS = {
    "cpu": dict(epochs=12, limit_train=10000, seeds=3, width=16, blocks=[1, 1, 1], krr_train=2000, krr_test=2000),
    "quick": dict(epochs=1, limit_train=500, seeds=1, width=4, blocks=[1, 1], krr_train=100, krr_test=100),
}
REGIMES = ("frnpf-ii", "flnpf", "relu")


def run(out, budget="cpu", seeds=None, epochs=None, env: Env | None = None) -> str:
    env = env or Env()
    b = budget_settings(BUDGETS, budget, seeds=seeds, epochs=epochs)
    out = Path(out)
    t0 = time.time()
    seeds_ = list(range(b["seeds"]))
    train_kw: dict[str, Any] = dict(
        arch="resnet",
        dataset="cifar10",
        optimizer="adam",
        lr=3e-4,
        epochs=b["epochs"],
        limit_train=b["limit_train"],
        width=b["width"],
        blocks=b["blocks"],
        data_root=env.data_root,
        device=env.device,
    )
    runs = out / "runs"
    env.log(f"ResNet (width {b['width']}, blocks {b['blocks']}): ReLU and FRNPF-II x seeds {seeds_}, one stack")
    first = [("relu", s) for s in seeds_] + [("frnpf-ii", s) for s in seeds_]
    train_many(
        [TrainConfig(regime=r, seed=s, **train_kw) for r, s in first],
        [runs / f"{r}-s{s}" for r, s in first],
        runs / "stack-phase1.pt",
        progress=env.progress,
        log=env.log,
    )
    env.log("FLNPF on each seed's best ReLU gates, one stack")
    train_many(
        [
            TrainConfig(regime="flnpf", seed=s, relu_checkpoint=str(runs / f"relu-s{s}" / "best.pt"), **train_kw)
            for s in seeds_
        ],
        [runs / f"flnpf-s{s}" for s in seeds_],
        runs / "stack-phase2.pt",
        progress=env.progress,
        log=env.log,
    )
    _kernels(out, b, train_kw, env)
    recs = collect(out)
    md = report(recs, budget, b, datasets.source_label("cifar10", env.data_root))
    return publish(out, "resnet", md, t0, out / "resnet.jsonl", lambda png: plot(recs, png))


def _kernels(out, b, train_kw, env):
    path = out / "kernels.jsonl"
    have = {r["gates"] for r in read_jsonl(path)}
    xtr, ytr = datasets.load("cifar10", "train", root=env.data_root, limit=b["krr_train"], seed=0)
    xte, yte = datasets.load("cifar10", "test", root=env.data_root, limit=b["krr_test"], seed=0)
    cfg = TrainConfig(regime="relu", seed=0, **train_kw).resolved()
    for gates in ("initial", "trained"):
        if gates in have:
            continue
        net, _ = build_regime("relu", "resnet", 0, None, **net_kwargs(cfg, (3, 32, 32), 10))
        if gates == "trained":
            net.load_state_dict(checkpoints.load(out / "runs" / "relu-s0" / "best.pt")["model"])
        rec = krr_on_npk(net, xtr, ytr, xte, yte, normalize="cosine", gates=gates, seed=0)
        append_jsonl(path, rec)
        env.log(f"NPK of the ResNet's {gates} gates + KRR: {100 * rec['test_acc']:.2f}%")


def collect(out) -> list:
    recs = [run_record(res) for res in sorted(Path(out).glob("runs/*/result.json"))]
    recs += [
        dict(r, regime=f"krr-npk-{r['gates']}", best_test_acc=r["test_acc"])
        for r in read_jsonl(Path(out) / "kernels.jsonl")
    ]
    common.write_jsonl(Path(out) / "resnet.jsonl", recs)
    return recs


def report(recs, budget, b, label) -> str:
    def ms(vals):
        return common.fmt_mean_std(vals, 100)

    lines = [
        f"# A CIFAR ResNet in the paper's regimes (budget `{budget}`: width {b['width']}, blocks {b['blocks']}, "
        f"no batch norm, {b['limit_train']} training images, full test set, Adam 3e-4, {b['epochs']} epochs, "
        f"{b['seeds']} seeds; data: {label})",
        "",
        "| regime | best % | clean % | final % | seeds |",
        "|---|---|---|---|---|",
    ]
    for reg in REGIMES:
        rs = [r for r in recs if r["regime"] == reg]
        lines.append(
            f"| {reg.upper()} | {ms([r['best_test_acc'] for r in rs])} | "
            f"{ms([r['clean_test_acc'] for r in rs])} | {ms([r['final_test_acc'] for r in rs])} | {len(rs)} |"
        )
    for g in ("initial", "trained"):
        rs = [r for r in recs if r["regime"] == f"krr-npk-{g}"]
        if rs:
            lines.append(
                f"| KRR on the cosine-normalised NPK of the ResNet's {g} gates (seed 0, "
                f"{rs[0]['n_train']} / {rs[0]['n_test']} images) | {100 * rs[0]['test_acc']:.2f} | — | — | 1 |"
            )
    return "\n".join(lines) + "\n"


def plot(recs, path):
    rows = present(REGIMES, recs, "regime")
    if not rows:
        return
    fig, ax = common.subplots(figsize=(5.5, 3.6))
    ms = [mean_std([100 * x["best_test_acc"] for x in recs if x["regime"] == r]) for r in rows]
    ax.bar(range(len(rows)), [m or 0.0 for m, _ in ms], yerr=[s or 0.0 for _, s in ms], color="#1f77b4")
    for i, g in enumerate(("initial", "trained")):
        k = [x for x in recs if x["regime"] == f"krr-npk-{g}"]
        if k:
            ax.axhline(
                100 * k[0]["test_acc"],
                ls=":" if g == "initial" else "--",
                color=f"C{i + 1}",
                label=f"KRR, NPK of {g} gates",
            )
    ax.set_xticks(range(len(rows)), [r.upper() for r in rows])
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    common.savefig(fig, path)
