"""Kernel machines on the NPK as the gates evolve (beyond the paper; docs/THEORY.md §2, §8).

A ReLU net (FC 6x128, Adam 1e-4; or a conv net on CIFAR-10) is trained with a checkpoint every epoch. For the
gates at initialisation (random: what FRNPF freezes), after each saved epoch, and for the NTK of the final network,
kernel ridge regression (one-hot targets, ridge chosen on a held-out part of the training points) and an SVM are fitted
on the precomputed kernel (float64, Cholesky with a reported jitter) and scored on the test points. The network's own
test accuracy on the same test points is the reference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints, datasets
from ..errors import NeuralpathError, check_choice, check_positive_int
from ..io import read_jsonl
from ..kernels.machines import accuracy, alignment, fit_predict
from ..kernels.npk import npk
from ..kernels.ntk import ntk
from ..regimes import build_regime
from ..train import PAPER_DEFAULTS, TrainConfig, net_kwargs, resolve_device, train
from .common import Env, add, done_keys, fmt_mean_std, label_axes, mean_std, publish, savefig, subplots

BUDGETS = {
    "quick": dict(n_train=10000, n_test=2000, epochs=3, methods=("krr", "svm")),
    "paper": dict(n_train=20000, n_test=10000, epochs=10, methods=("krr", "svm")),
}


def kernels_for(net, xtr, xte, kind):
    """(K_train (n, n), K_test_train (m, n)) in float64; kind npk | ntk | npk-inf (the infinite-width NPK of random
    ReLU gates of the network's depth)."""
    net = net.double()
    dev = next(net.parameters()).device
    a, b = xtr.to(dev, torch.float64), xte.to(dev, torch.float64)
    if kind == "npk-inf":
        from ..kernels.infinite import npk_infinite

        return npk_infinite(a, depth=net.depth), npk_infinite(b, a, depth=net.depth)
    if kind == "npk":
        return npk(net, a), npk(net, b, a)
    return ntk(net, a, params="all"), ntk(net, b, a, params="all")


def run(
    out,
    budget="quick",
    arch="fc",
    n_train=None,
    n_test=None,
    epochs=None,
    seed=0,
    env: Env | None = None,
) -> str:
    env = env or Env(device="cpu")
    check_choice("budget", budget, tuple(BUDGETS))
    check_choice("arch", arch, ("fc", "vconv", "gconv"))
    b: dict[str, Any] = dict(BUDGETS[budget])
    for flag, v in (("--n-train", n_train), ("--n-test", n_test), ("--epochs", epochs)):
        if v is not None:  # 0 is a request, not "the budget's default"
            check_positive_int(flag, v)
    n_train = b["n_train"] if n_train is None else n_train
    n_test = b["n_test"] if n_test is None else n_test
    epochs = b["epochs"] if epochs is None else epochs
    out = Path(out)
    t0 = time.time()
    dataset = "mnist" if arch == "fc" else "cifar10"
    cfg = TrainConfig(
        arch=arch,
        dataset=dataset,
        regime="relu",
        optimizer="adam",
        lr=PAPER_DEFAULTS[(arch, "adam")][0],
        epochs=epochs,
        seed=seed,
        limit_train=n_train,
        limit_test=n_test,
        save_every=1,
        data_root=env.data_root,
        device=env.device,
    )
    env.log(f"training the ReLU {arch} net ({epochs} epochs on {n_train} training images) into {out / 'relu'}")
    relu = train(cfg, out / "relu", resume=True, progress=env.progress)
    xtr, ytr = datasets.load(dataset, "train", root=env.data_root, limit=n_train, seed=seed)
    xte, yte = datasets.load(dataset, "test", root=env.data_root, limit=n_test, seed=0)
    rc = cfg.resolved()
    stages = (
        ([("npk-inf", 0)] if arch == "fc" else [])
        + [("npk", 0)]
        + [("npk", e) for e in range(1, epochs + 1)]
        + [("ntk", epochs)]
    )
    rec_path = out / "kernels.jsonl"
    have = done_keys(rec_path, lambda r: (r["kernel"], r["epoch"], r["method"]))
    for kind, ep in stages:
        if all((kind, ep, m) in have for m in b["methods"]):
            continue
        net, _ = build_regime("relu", arch, seed, None, **net_kwargs(rc, xtr.shape[1:], 10))
        net.to(resolve_device(env.device))
        if ep > 0:
            net.load_state_dict(checkpoints.load(out / "relu" / f"epoch_{ep}.pt")["model"])
        t = time.time()
        K, Kt = kernels_for(net, xtr, xte, kind)
        tk = time.time() - t
        al = alignment(K[:2000, :2000], ytr[:2000])
        for m in b["methods"]:
            if (kind, ep, m) in have:
                continue
            t = time.time()
            pred, info = fit_predict(m, K, ytr, Kt)
            rec = {
                "kernel": kind,
                "epoch": ep,
                "method": m,
                "test_acc": accuracy(pred, yte),
                "n_train": n_train,
                "n_test": n_test,
                "kernel_seconds": tk,
                "fit_seconds": time.time() - t,
                "alignment_2000": al,
                **info,
            }
            add(rec_path, rec)
            env.log(f"{kind.upper()} gates@epoch {ep} {m}: test accuracy {100 * rec['test_acc']:.2f}%")
        del K, Kt
    recs = list(read_jsonl(rec_path))
    net_acc = {r["epoch"]: r["test_acc"] for r in read_jsonl(out / "relu" / "metrics.jsonl")}
    data = datasets.source_label(dataset, env.data_root)
    title = (
        f"# Kernel machines on the NPK as the gates evolve ({arch}, budget `{budget}`: {n_train} training / "
        f"{n_test} test images, ReLU net trained {epochs} epochs; data: {data})"
    )
    md = report(recs, stages, net_acc, title)
    md += f"\nReLU net best test accuracy {100 * relu['best_test_acc']:.2f}%."
    return publish(out, "kernels", md, t0, rec_path, lambda png: plot(recs, net_acc, png))


def report(recs, stages, net_acc, title) -> str:
    """The markdown table from the kernel records (one row per kernel and gate epoch of ``stages``) and the ReLU
    net's test accuracy per epoch ``net_acc``."""
    lines = [
        title,
        "",
        "Test accuracy %. NPK@e = neural path kernel of the ReLU net's gates after e epochs (e = 0: random "
        "gates); NPK-INF = the infinite-width NPK of random gates (docs/THEORY.md §8); NTK = empirical NTK of "
        "the final net. 'net' = that ReLU net's own test accuracy at epoch e.",
        "",
        "| kernel | gates from epoch | KRR | SVM | net | alignment (2000 pts) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, ep in stages:
        row = {r["method"]: r for r in recs if r["kernel"] == kind and r["epoch"] == ep}
        if not row:
            continue
        any_r = next(iter(row.values()))
        na = net_acc.get(ep)
        lines.append(
            f"| {kind.upper()} | {'∞ width' if kind == 'npk-inf' else ep} | "
            + " | ".join(f"{100 * row[m]['test_acc']:.2f}" if m in row else "—" for m in ("krr", "svm"))
            + f" | {'—' if na is None else f'{100 * na:.2f}'} | {any_r['alignment_2000']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(recs, net_acc, path):
    """Test accuracy of the NPK machines against the epoch of the gates, beside the net itself (PNG)."""
    fig, ax = subplots(figsize=(6, 3.9))
    for m, style in (("krr", "o-"), ("svm", "s-")):
        pts = sorted((r["epoch"], 100 * r["test_acc"]) for r in recs if r["kernel"] == "npk" and r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), style, label=f"NPK + {m.upper()}")
        inf = [100 * r["test_acc"] for r in recs if r["kernel"] == "npk-inf" and r["method"] == m]
        if inf:
            ax.axhline(
                inf[0], ls="--", color="tab:gray" if m == "krr" else "silver", label=f"infinite-width NPK + {m.upper()}"
            )
        nt = [100 * r["test_acc"] for r in recs if r["kernel"] == "ntk" and r["method"] == m]
        if nt:
            ax.axhline(
                nt[0], ls=":", color="tab:green" if m == "krr" else "tab:olive", label=f"final NTK + {m.upper()}"
            )
    pts = sorted((e, 100 * a) for e, a in net_acc.items())
    if pts:
        ax.plot(*zip(*pts), "k^--", label="the ReLU net itself")
    label_axes(ax, "epoch of the ReLU net whose gates define the NPK", "test accuracy %")
    fig.tight_layout()
    savefig(fig, path)


CNTK_CIFAR10 = 77.43  # Arora et al. 2019, the convolutional NTK on CIFAR-10, as the paper quotes it


def run_on_run(out, relu_runs, n_train=3000, n_test=1000, env: Env | None = None) -> str:
    """The conv analogue of :func:`run` on already trained ReLU runs (e.g. a table row's ``relu-s0,relu-s1,...``):
    kernel ridge regression on the NPK of each run's gates at initialisation (rebuilt from its config and seed) and
    at its best epoch, on the same stratified subsets of the runs' data set; with several runs, mean +- std over
    them. Resumable: a (run, gates) pair already in the records is skipped."""
    env = env or Env(device="cpu")
    from ..runfolder import RunFolder
    from ..train import value_init_seed

    relu_runs = [relu_runs] if isinstance(relu_runs, str | Path) else list(relu_runs)
    if not relu_runs:
        raise NeuralpathError("--relu-run: name at least one finished ReLU run folder")
    runs, seen = [], {}
    for rr in relu_runs:
        key = Path(rr).resolve()
        if key in seen:  # it would count twice in the mean +- std
            raise NeuralpathError(f"--relu-run names {seen[key]} twice (as {seen[key]} and {rr}); name each run once")
        seen[key] = rr
        f = RunFolder(rr)
        cfg_d = f.config()
        if not f.finished or cfg_d is None or cfg_d.get("regime") != "relu":
            raise NeuralpathError(f"--relu-run {rr}: needs a finished ReLU run folder (with result.json)")
        cfg = TrainConfig(**{k: v for k, v in cfg_d.items() if k in TrainConfig.__dataclass_fields__}).resolved()
        runs.append((str(Path(rr)), f, cfg))
    for rr, _, cfg in runs[1:]:  # one table: the same data set and architecture for every run
        for k in ("dataset", "arch", "channels", "hidden", "width", "depth"):
            if getattr(cfg, k, None) != getattr(runs[0][2], k, None):
                raise NeuralpathError(
                    f"--relu-run {rr}: {k}={getattr(cfg, k, None)!r} but {runs[0][0]} has "
                    f"{getattr(runs[0][2], k, None)!r}; the runs of one report share data set and network"
                )
    cfg0 = runs[0][2]
    datasets.check_limit("--n-train", n_train, cfg0.dataset, "train", root=env.data_root)
    datasets.check_limit("--n-test", n_test, cfg0.dataset, "test", root=env.data_root)
    if n_train < 2:
        raise NeuralpathError(f"--n-train {n_train}: a kernel machine needs at least 2 training points")
    out = Path(out)
    rec_path = out / "kernels-run.jsonl"
    old = read_jsonl(rec_path) if rec_path.exists() else []
    other = [r for r in old if (r["n_train"], r["n_test"]) != (n_train, n_test)]
    if other:  # the report states one pair of sizes for every run: records of other sizes would be read as these
        raise NeuralpathError(
            f"{out} holds records made with --n-train {other[0]['n_train']} --n-test {other[0]['n_test']}; "
            f"this request is --n-train {n_train} --n-test {n_test}: pick another --out or the same sizes"
        )
    t0 = time.time()
    xtr, ytr = datasets.load(cfg0.dataset, "train", root=env.data_root, limit=n_train, seed=0)
    xte, yte = datasets.load(cfg0.dataset, "test", root=env.data_root, limit=n_test, seed=0)
    have = {(r["run"], r["gates"]) for r in old}
    dev = resolve_device(env.device)
    for rr, f, cfg in runs:
        for gates in ("initial", "trained"):
            if (rr, gates) in have:
                continue
            net, _ = build_regime(
                "relu", cfg.arch, value_init_seed("relu", cfg.seed), None, **net_kwargs(cfg, xtr.shape[1:], 10)
            )
            if gates == "trained":
                net.load_state_dict(checkpoints.load(f.file("best.pt"))["model"])
            net = net.to(dev)
            t = time.time()
            # float32 kernels (conv NPKs are memory-bound: half the bytes), solved in float64
            K = npk(net, xtr.to(dev)).double()
            Kt = npk(net, xte.to(dev), xtr.to(dev)).double()
            tk = time.time() - t
            pred, info = fit_predict("krr", K, ytr, Kt)
            rec = {
                "gates": gates,
                "run": rr,
                "seed": cfg.seed,
                "arch": cfg.arch,
                "channels": cfg.channels,
                "n_train": len(ytr),
                "n_test": len(yte),
                "test_acc": accuracy(pred, yte),
                "net_best_test_acc": f.result()["best_test_acc"],
                "kernel_seconds": tk,
                "alignment_2000": alignment(K[:2000, :2000], ytr[:2000]),
                **info,
            }
            add(rec_path, rec)
            env.log(f"{rr}: NPK of the {gates} gates + KRR: {100 * rec['test_acc']:.2f}% ({tk:.0f} s for the kernels)")
    mine = {rr for rr, _, _ in runs}
    recs = [r for r in read_jsonl(rec_path) if r["run"] in mine]
    nets = {rr: f.result()["best_test_acc"] for rr, f, _ in runs}
    lines = [
        f"# Kernel ridge regression on the NPK of trained {cfg0.arch} ReLU nets ({len(runs)} run(s); {n_train} "
        f"training / {n_test} test images, the same for every run; data: "
        f"{datasets.source_label(cfg0.dataset, env.data_root)})",
        "",
        "| run | NPK of the initial gates + KRR % | NPK of the trained gates + KRR % | trained - initial (points) "
        "| alignment initial / trained (2,000 pts) | the ReLU net itself % (best epoch, full test set) |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["run"], r["gates"]): r for r in recs}
    diffs = []
    for rr, _, _ in runs:
        a, b = by.get((rr, "initial")), by.get((rr, "trained"))
        if a is None or b is None:
            continue
        diffs.append(100 * (b["test_acc"] - a["test_acc"]))
        lines.append(
            f"| {rr} | {100 * a['test_acc']:.2f} | {100 * b['test_acc']:.2f} | {diffs[-1]:+.2f} | "
            f"{a['alignment_2000']:.3f} / {b['alignment_2000']:.3f} | {100 * nets[rr]:.2f} |"
        )
    if len(diffs) > 1:
        ms = fmt_mean_std
        g = {k: [100 * r["test_acc"] for r in recs if r["gates"] == k] for k in ("initial", "trained")}
        al = {k: [r["alignment_2000"] for r in recs if r["gates"] == k] for k in ("initial", "trained")}
        lines.append(
            f"| mean ± std (n = {len(diffs)}) | {ms(g['initial'])} | {ms(g['trained'])} | {ms(diffs)} | "
            f"{mean_std(al['initial'])[0]:.3f} / {mean_std(al['trained'])[0]:.3f} | "
            f"{ms([100 * v for v in nets.values()])} |"
        )
    lines += ["", f"Reference: CNTK on all of CIFAR-10 (Arora et al. 2019, quoted by the paper): {CNTK_CIFAR10}%."]
    return publish(out, "kernels-run", "\n".join(lines) + "\n", t0, rec_path, lambda png: plot_runs(recs, nets, png))


def plot_runs(recs, nets, path):
    """Per run: KRR on the NPK of the initial and of the trained gates, beside the ReLU net itself."""
    fig, ax = subplots(figsize=(6.5, 3.6))
    names = list(nets)
    for j, (gates, colour) in enumerate((("initial", "tab:gray"), ("trained", "tab:blue"))):
        ys = [next((100 * r["test_acc"] for r in recs if r["run"] == n and r["gates"] == gates), 0.0) for n in names]
        xs = [i + 0.27 * (j - 1) for i in range(len(names))]
        ax.bar(xs, ys, 0.27, color=colour, label=f"NPK of {gates} gates + KRR")
    ax.bar([i + 0.27 for i in range(len(names))], [100 * nets[n] for n in names], 0.27, color="k", alpha=0.6,
           label="the ReLU net itself")  # fmt: skip
    ax.set_xticks(range(len(names)), [Path(n).name for n in names])
    top = max([100 * r["test_acc"] for r in recs] + [100 * v for v in nets.values()] + [1.0])
    ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    label_axes(ax, "ReLU run", "test accuracy %")
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    savefig(fig, path)
