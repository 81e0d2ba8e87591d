"""Where does the paper's ordering appear? Accuracy against training budget for ReLU and FRNPF-II (and FLNPF).

The paper's conv rows (arXiv 2006.10529, section 6: GCONV-Adam FRNPF-II 67.09 vs ReLU 80.32) come from 200 epochs on
50,000 CIFAR-10 images at full width, which 2 CPU cores cannot train. Frozen random gates make the problem linear in
the value weights, which trains faster at first; a ReLU net must learn its gates before it pulls ahead. This
experiment measures, on CIFAR-10 (JPEG copy here), for a grid of (width multiplier of GCONV, training images):
the best-so-far test accuracy (full 10,000-image test set) of ReLU and FRNPF-II after every epoch, the gap
ReLU - FRNPF-II against epochs and against image-passes (images x epochs), the epoch where the gap turns positive
and where it reaches 5 points, and FLNPF trained on the final ReLU net's best gates. That curve is what the CPU
budget of the conv rows is chosen from (``reproduce table --budget cpu``).

compute (:func:`run`: trains, resumable) -> records (``curve.jsonl``, one per run and epoch) -> report
(:func:`report`: markdown from records) -> plot (:func:`plot`: PNG from records).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import NeuralpathError, check_positive_int
from ..runfolder import RunFolder
from ..train import TrainConfig, train_many
from .common import Env, publish, pyplot, savefig, write_jsonl

PAPER = {"relu": 80.32, "frnpf-ii": 67.09, "flnpf": 79.68}  # GCONV, Adam, the paper's budget
# (width multiplier, training images, epochs, with FLNPF): the measured grid (docs/RESULTS.md)
GRIDS = {
    "cpu": [
        (0.25, 10000, 120, True),
        (0.125, 10000, 150, False),
        (0.25, 5000, 100, False),
        (0.25, 20000, 40, False),
        (0.5, 10000, 20, True),  # FLNPF added in session 14, after the ReLU and FRNPF-II runs had finished
    ],
    "cpu-main": [(0.25, 10000, 120, True)],  # the first point of the grid alone (the width and images of --budget cpu)
    "tiny": [(0.125, 200, 2, True)],
}


def conv_widths(mult: float):
    """GCONV/VCONV channels and dense widths at a width multiplier of the paper's (64, 64, 128, 128; 256, 256)."""
    if not 0 < mult <= 1:
        raise NeuralpathError(f"width multiplier {mult!r} must be in (0, 1]")
    return [max(1, round(c * mult)) for c in (64, 64, 128, 128)], [max(1, round(h * mult)) for h in (256, 256)]


def cifar_adam(arch, width, limit_train, epochs, **rest) -> dict[str, Any]:
    """TrainConfig settings of a conv run on CIFAR-10 at ``width`` x the paper's widths, Adam 3e-4 (the paper's conv
    optimiser), a stratified ``limit_train``-image subset: what the budget curve and the conv DLGN share."""
    ch, hid = conv_widths(width)
    return dict(
        arch=arch,
        dataset="cifar10",
        optimizer="adam",
        lr=3e-4,
        epochs=epochs,
        channels=ch,
        hidden=hid,
        limit_train=limit_train,
        **rest,
    )


def _name(w, n):
    return f"w{w:g}-n{n}"


def run(out, grid="cpu", arch="gconv", seed=0, limit_test=None, points=None, env: Env | None = None) -> str:
    """Train the grid's points (``points``: a comma-separated subset of their names, e.g. 'w0.5-n10000', in the
    grid's order) and write the curve, table and plot of every point found under ``out``."""
    env = env or Env()
    if grid not in GRIDS:
        raise NeuralpathError(f"--grid {grid!r} is not known; choose one of {', '.join(GRIDS)}")
    todo = GRIDS[grid]
    if points is not None:
        names = [_name(w, n) for w, n, _, _ in todo]
        want = [p.strip() for p in str(points).split(",") if p.strip()]
        bad = [p for p in want if p not in names]
        if bad or not want:
            raise NeuralpathError(
                f"--points {points!r}: {', '.join(bad) or 'no point named'} not in the {grid} grid; its points are "
                f"{', '.join(names)}"
            )
        todo = [pt for pt, nm in zip(todo, names) if nm in want]
    if limit_test is not None:  # checked before the first point starts (its settings are resolved per point)
        check_positive_int("--limit-test", limit_test)
    out = Path(out)
    t0 = time.time()
    for w, n, epochs, with_flnpf in todo:
        base = cifar_adam(
            arch, w, n, epochs, seed=seed, limit_test=limit_test, data_root=env.data_root, device=env.device
        )
        d = out / "runs" / _name(w, n)
        env.log(f"budget curve {_name(w, n)}: ReLU and FRNPF-II, {epochs} epochs on {n} images")
        # a curve may be extended: more epochs continue the runs (allow_change), the records say so
        train_many(
            [TrainConfig(regime=r, **base) for r in ("relu", "frnpf-ii")],
            [d / "relu", d / "frnpf-ii"],
            d / "stack.pt",
            resume=True,
            progress=env.progress,
            log=env.log,
            allow_change=("epochs",),
        )
        if with_flnpf:
            env.log(f"budget curve {_name(w, n)}: FLNPF on the ReLU net's best gates")
            train_many(
                [TrainConfig(regime="flnpf", relu_checkpoint=str(d / "relu" / "best.pt"), **base)],
                [d / "flnpf"],
                d / "flnpf" / "last.pt",
                resume=True,
                progress=env.progress,
                log=env.log,
            )
    recs = collect(out)
    return publish(out, "budget", report(recs), t0, out / "curve.jsonl", lambda png: plot(recs, png))


def collect(out) -> list:
    """One record per run and epoch: test accuracy and best-so-far; rewrites ``out/curve.jsonl``."""
    recs = []
    for res in sorted((Path(out) / "runs").glob("*/*/config.json")):
        f = RunFolder(res.parent)
        c = f.config()
        if c is None:  # a folder whose run has not started
            continue
        best, data, finished = -1.0, f.data(), f.finished
        for m in f.records():
            best = max(best, m["test_acc"])
            recs.append(
                {
                    "arch": c["arch"],
                    "width": c["channels"][0] / 64,
                    "n_train": c["limit_train"],
                    "regime": c["regime"],
                    "seed": c["seed"],
                    "epoch": m["epoch"],
                    "test_acc": m["test_acc"],
                    "best_so_far": best,
                    "train_acc": m["train_acc"],
                    "seconds": m["seconds"],
                    "finished": finished,
                    "data": data,
                }
            )
    write_jsonl(Path(out) / "curve.jsonl", recs)
    return recs


def _series(recs, w, n, regime):
    return {
        r["epoch"]: r["best_so_far"] for r in recs if r["width"] == w and r["n_train"] == n and r["regime"] == regime
    }


def gaps(recs):
    """(width, n) -> dict(epochs, relu, frnpf, gap list, first epoch with gap > 0 from then on, first with >= 5)."""
    out = {}
    for w, n in sorted({(r["width"], r["n_train"]) for r in recs}):
        a, b = _series(recs, w, n, "relu"), _series(recs, w, n, "frnpf-ii")
        eps = sorted(set(a) & set(b))
        if not eps:
            continue
        g = [100 * (a[e] - b[e]) for e in eps]
        cross = next((eps[i] for i in range(len(eps)) if all(x > 0 for x in g[i:])), None)
        five = next((e for e, x in zip(eps, g) if x >= 5), None)
        fl = _series(recs, w, n, "flnpf")
        out[(w, n)] = dict(
            epochs=eps,
            relu=[100 * a[e] for e in eps],
            frnpf=[100 * b[e] for e in eps],
            gap=g,
            cross=cross,
            five=five,
            flnpf=100 * max(fl.values()) if fl else None,
        )
    return out


def _labels(recs) -> tuple[str, str, str]:
    """The architecture(s), seed(s) and data copy the records name (never a fixed label: ``run`` takes --arch and
    --seed, and the data may be the JPEG copy or the official files)."""

    def names(key, fmt):
        vals = sorted({r[key] for r in recs if r.get(key) is not None}, key=str)
        return ", ".join(fmt(v) for v in vals)

    return names("arch", str.upper) or "GCONV", names("seed", str) or "?", names("data", str) or "CIFAR-10"


def report(recs) -> str:
    gp = gaps(recs)
    arch, seeds, data = _labels(recs)
    lines = [
        f"# ReLU - FRNPF-II against training budget ({arch}, Adam 3e-4, batch 32; best-so-far test accuracy)",
        "",
        f"Each row: a width multiplier of the paper's {arch} and a stratified training subset of {data}, seed "
        f"{seeds}. 'crosses' = first epoch from which ReLU stays ahead; '>= 5' = first epoch with a gap of 5 points.",
        "",
        "| width | images | epochs | ReLU % | FRNPF-II % | gap | crosses at epoch | gap >= 5 at epoch | FLNPF % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (w, n), s in gp.items():
        lines.append(
            f"| {w:g} | {n} | {s['epochs'][-1]} | {s['relu'][-1]:.2f} | {s['frnpf'][-1]:.2f} | "
            f"{s['gap'][-1]:+.2f} | {s['cross'] or '—'} | {s['five'] or '—'} | "
            + ("—" if s["flnpf"] is None else f"{s['flnpf']:.2f}")
            + " |"
        )
    lines += [
        "",
        f"Paper (GCONV, full width, 50,000 images, 200 epochs): ReLU {PAPER['relu']}, FRNPF-II "
        f"{PAPER['frnpf-ii']}, FLNPF {PAPER['flnpf']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(recs, path):
    gp = gaps(recs)
    if not gp:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, ((w, n), s) in enumerate(gp.items()):
        col = cmap(i / max(1, len(gp) - 1))
        lab = f"width {w:g}, {n} images"
        axes[0].plot(s["epochs"], s["relu"], "-", color=col, label=f"ReLU, {lab}")
        axes[0].plot(s["epochs"], s["frnpf"], "--", color=col, label=f"FRNPF-II, {lab}")
        fl = _series(recs, w, n, "flnpf")
        if fl:
            axes[0].plot(sorted(fl), [100 * fl[e] for e in sorted(fl)], ":", lw=2, color=col, label=f"FLNPF, {lab}")
        axes[1].plot(s["epochs"], s["gap"], "-o", ms=2, color=col, label=lab)
        axes[2].plot([e * n for e in s["epochs"]], s["gap"], "-o", ms=2, color=col, label=lab)
    axes[0].set(
        xlabel="epoch", ylabel="best-so-far test accuracy %", title="ReLU (solid), FRNPF-II (dashed), FLNPF (dotted)"
    )
    axes[0].legend(fontsize=6)
    for ax, xl in ((axes[1], "epoch"), (axes[2], "image-passes (images x epochs)")):
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(5, color="gray", ls=":", lw=0.8)
        ax.set(xlabel=xl, ylabel="ReLU - FRNPF-II (points)", title=f"gap against {xl.split(' ')[0]}")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    axes[1].legend(fontsize=7)
    arch, seeds, data = _labels(recs)
    fig.suptitle(f"{arch} on {data}, seed {seeds}: when do learnt gates beat random gates?")
    fig.tight_layout()
    savefig(fig, path)
