"""The paper's table (SPEC §5-§6): 6 rows (arch x optimiser) x 5 regimes x seeds, beside the authors' numbers.

Layout of ``out``:
    runs/<row>/<regime>-s<seed>/     one run folder each (train.train's format: metrics.jsonl, best.pt, result.json)
    runs/<row>/ensemble-*.pt         the vectorised ensemble's checkpoint (fc rows)
    runs.jsonl                       one record per finished run (rebuilt from the result.json files, atomically)
    table.md, table.png              the side-by-side table and the bar chart

Protocols reported: ``best`` = best test accuracy over epochs (the authors'; the test set selects the epoch),
``final`` = last epoch, ``clean`` = epoch selected on half of the test set, accuracy on the other half (both ways,
averaged): the gap between ``best`` and ``clean`` is what the test-set selection adds.

Resumable and safe to run twice at once: a finished run (result.json) is skipped; a killed run or ensemble resumes
from its last checkpoint; each row is trained under a file lock, so a second sweep on the same folder waits for the
row and then finds it done; every record is one file per run, and runs.jsonl is derived from them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import datasets
from ..errors import NeuralpathError, check_choice
from ..io import atomic_path, write_text
from ..regimes import REGIMES
from ..train import PAPER_DEFAULTS, TrainConfig, train_many
from .common import mean_std

ROWS = {"fc-sgd": ("fc", "sgd", "mnist"), "fc-adam": ("fc", "adam", "mnist"),
        "vconv-sgd": ("vconv", "sgd", "cifar10"), "vconv-adam": ("vconv", "adam", "cifar10"),
        "gconv-sgd": ("gconv", "sgd", "cifar10"), "gconv-adam": ("gconv", "adam", "cifar10")}
# The authors' table (SPEC §6): regime -> (mean %, std %)
PAPER = {
    "fc-sgd": {"frnpf-ii": (95.85, .10), "frnpf-di": (95.85, .17), "dlnpf": (97.86, .11), "flnpf": (97.10, .09), "relu": (97.85, .09)},
    "fc-adam": {"frnpf-ii": (96.02, .13), "frnpf-di": (96.09, .12), "dlnpf": (98.22, .05), "flnpf": (97.82, .02), "relu": (98.14, .07)},
    "vconv-sgd": {"frnpf-ii": (58.92, .62), "frnpf-di": (58.83, .27), "dlnpf": (63.21, .07), "flnpf": (63.06, .73), "relu": (67.02, .43)},
    "vconv-adam": {"frnpf-ii": (64.86, 1.18), "frnpf-di": (64.68, .84), "dlnpf": (69.45, .76), "flnpf": (71.40, .47), "relu": (72.43, .54)},
    "gconv-sgd": {"frnpf-ii": (67.36, .56), "frnpf-di": (66.86, .44), "dlnpf": (74.57, .43), "flnpf": (78.52, .39), "relu": (78.90, .37)},
    "gconv-adam": {"frnpf-ii": (67.09, .58), "frnpf-di": (67.08, .27), "dlnpf": (77.12, .19), "flnpf": (79.68, .32), "relu": (80.32, .35)},
}
ORDER = ("frnpf-ii", "frnpf-di", "dlnpf", "flnpf", "relu")  # the paper's column order
BUDGETS = ("quick", "paper")
# quick: what 2 CPU cores do in minutes. FC: full MNIST, few epochs. Conv: a stratified CIFAR-10 subset.
QUICK = {"fc": dict(epochs=5, limit_train=None, limit_test=None),
         "vconv": dict(epochs=2, limit_train=500, limit_test=500),
         "gconv": dict(epochs=2, limit_train=500, limit_test=500)}


def row_settings(row, budget, epochs=None, limit_train=None, limit_test=None):
    """(arch, optimizer, dataset, lr, epochs, limit_train, limit_test) of a row under a budget and overrides."""
    check_choice("row", row, tuple(ROWS))
    check_choice("budget", budget, BUDGETS)
    arch, opt, data = ROWS[row]
    lr, ep = PAPER_DEFAULTS[(arch, opt)]
    lt, le = None, None
    if budget == "quick":
        q = QUICK[arch]
        ep, lt, le = q["epochs"], q["limit_train"], q["limit_test"]
    ep = epochs or ep
    lt = limit_train or lt
    le = limit_test or le
    return dict(arch=arch, optimizer=opt, dataset=data, lr=lr, epochs=ep, limit_train=lt, limit_test=le)


def _lock(path):
    from filelock import FileLock
    return FileLock(str(path))


def run_row(row, seeds, budget, out, *, epochs=None, limit_train=None, limit_test=None, data_root=None,
            device="auto", progress=None, log=print, stacked=True):
    """Train the 5 regimes x ``seeds`` of one row (FLNPF after ReLU: it takes the same seed's best ReLU gates)."""
    st = row_settings(row, budget, epochs, limit_train, limit_test)
    rdir = Path(out) / "runs" / row
    rdir.mkdir(parents=True, exist_ok=True)

    def cfg(regime, seed):
        c = TrainConfig(arch=st["arch"], dataset=st["dataset"], regime=regime, optimizer=st["optimizer"], lr=st["lr"],
                        epochs=st["epochs"], seed=seed, limit_train=st["limit_train"], limit_test=st["limit_test"],
                        data_root=data_root, device=device)
        if regime == "flnpf":
            c.relu_checkpoint = str(rdir / f"relu-s{seed}" / "best.pt")
        return c

    first = [(r, s) for r in ("relu", "frnpf-ii", "frnpf-di", "dlnpf") for s in seeds]
    second = [("flnpf", s) for s in seeds]
    with _lock(rdir / ".lock"):
        for phase, runs in (("phase1", first), ("phase2", second)):
            cfgs = [cfg(r, s) for r, s in runs]
            outs = [rdir / f"{r}-s{s}" for r, s in runs]
            if stacked:
                left = sum(not (o / "result.json").exists() for o in outs)
                log(f"{row}: {left} of {len(runs)} runs left to train, as one stack ({phase})")
                train_many(cfgs, outs, rdir / f"stack-{phase}.pt", resume=True, progress=progress, log=log)
            else:
                for c, o in zip(cfgs, outs):
                    train_many([c], [o], o / "last.pt", resume=True, progress=progress, log=log)
    return st


def collect(out):
    """Every finished run under ``out`` as a record; also rewrites ``out/runs.jsonl`` (atomically)."""
    recs = []
    for res in sorted((Path(out) / "runs").glob("*/*/result.json")):
        r = json.loads(res.read_text())
        c = r["config"]
        row = res.parent.parent.name
        recs.append({"row": row, "regime": c["regime"], "seed": c["seed"], "best_test_acc": r["best_test_acc"],
                     "best_epoch": r["best_epoch"], "final_test_acc": r["final_test_acc"],
                     "clean_test_acc": r.get("clean_test_acc"), "epochs": c["epochs"], "lr": c["lr"],
                     "limit_train": c["limit_train"], "limit_test": c["limit_test"], "data": r.get("data"),
                     "device": r.get("device"), "run": str(res.parent)})
    with atomic_path(Path(out) / "runs.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in recs))
    return recs


def _ms(vals):
    return mean_std([100 * v for v in vals if v is not None])


def summarise(recs, rows):
    """row -> regime -> dict(best=(mean, std), final=..., clean=..., n=seeds)."""
    out = {}
    for row in rows:
        out[row] = {}
        for reg in ORDER:
            rs = [r for r in recs if r["row"] == row and r["regime"] == reg]
            out[row][reg] = dict(n=len(rs), best=_ms([r["best_test_acc"] for r in rs]),
                                 final=_ms([r["final_test_acc"] for r in rs]),
                                 clean=_ms([r["clean_test_acc"] for r in rs]))
    return out


def _fmt(ms):
    return "—" if ms[0] is None else f"{ms[0]:.2f}±{ms[1]:.2f}"


def table_markdown(summary, settings, budget, seeds, data_labels) -> str:
    lines = [f"# The paper's table: ours (budget `{budget}`, seeds {list(seeds)}) beside the authors'", ""]
    for row, st in settings.items():
        lim = "full training split" if not st["limit_train"] else f"stratified subset of {st['limit_train']} training images"
        tl = "full test split" if not st["limit_test"] else f"stratified subset of {st['limit_test']} test images"
        lines.append(f"- **{row}**: {st['optimizer']} lr {st['lr']:g}, {st['epochs']} epochs, batch 32, {lim}, {tl}; "
                     f"data: {data_labels.get(row, st['dataset'])}"
                     + ("" if budget == "paper" else " — NOT the paper's budget"))
    lines += ["", "Test accuracy %, mean ± population std over seeds. best = best test epoch (the authors' protocol); "
              "clean = epoch chosen on one half of the test set, reported on the other; Δ = ours(best) − paper.", "",
              "| row | regime | paper | ours best | Δ | ours clean | ours final | seeds |", "|---|---|---|---|---|---|---|---|"]
    for row in settings:
        for reg in ORDER:
            s = summary[row][reg]
            p = PAPER[row][reg]
            d = "—" if s["best"][0] is None else f"{s['best'][0] - p[0]:+.2f}"
            lines.append(f"| {row} | {reg.upper()} | {p[0]:.2f}±{p[1]:.2f} | {_fmt(s['best'])} | {d} | "
                         f"{_fmt(s['clean'])} | {_fmt(s['final'])} | {s['n']} |")
    return "\n".join(lines) + "\n"


def plot(summary, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        x = np.arange(len(ORDER))
        ours = [summary[row][r]["best"] for r in ORDER]
        paper = [PAPER[row][r] for r in ORDER]
        ax.bar(x - 0.2, [p[0] for p in paper], 0.4, yerr=[p[1] for p in paper], label="paper", color="#bbbbbb",
               hatch="//", edgecolor="#666666")
        ax.bar(x + 0.2, [o[0] or 0 for o in ours], 0.4, yerr=[o[1] or 0 for o in ours], label="ours", color="#1f77b4")
        vals = [p[0] for p in paper] + [o[0] for o in ours if o[0] is not None]
        lo = max(0.0, min(vals) - 5)
        ax.set_ylim(lo, min(100.0, max(vals) + 2))
        ax.set_xticks(x, [r.upper() for r in ORDER], rotation=30, fontsize=8)
        ax.set_title(row)
        ax.set_ylabel("test accuracy %")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(out, rows=None, seeds=2, budget="quick", *, epochs=None, limit_train=None, limit_test=None, data_root=None,
        device="auto", progress=None, log=print, stacked=True) -> str:
    rows = list(rows or ROWS)
    for r in rows:
        check_choice("row", r, tuple(ROWS))
    if isinstance(seeds, int):
        if seeds < 1:
            raise NeuralpathError(f"seeds={seeds!r} must be >= 1")
        seeds = list(range(seeds))
    check_choice("budget", budget, BUDGETS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings, labels = {}, {}
    t0 = time.time()
    for row in rows:
        log(f"row {row}: {len(REGIMES)} regimes x {len(seeds)} seeds ({budget} budget)")
        settings[row] = run_row(row, seeds, budget, out, epochs=epochs, limit_train=limit_train,
                                limit_test=limit_test, data_root=data_root, device=device, progress=progress,
                                log=log, stacked=stacked)
        labels[row] = datasets.source_label(settings[row]["dataset"], data_root)
    recs = [r for r in collect(out) if r["row"] in rows and r["seed"] in seeds]
    summary = summarise(recs, rows)
    md = table_markdown(summary, settings, budget, seeds, labels)
    md += f"\nWall time of this invocation: {time.time() - t0:.0f} s. Records: {out / 'runs.jsonl'}; plot: {out / 'table.png'}\n"
    write_text(out / "table.md", md)
    plot(summary, rows, out / "table.png")
    return md
