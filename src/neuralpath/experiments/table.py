"""The paper's table (arXiv 2006.10529, its table of results): 6 rows (arch x optimiser) x 5 regimes x seeds,
beside the authors' numbers.

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
from typing import Any

from ..errors import NeuralpathError, check_choice, check_positive_int
from ..io import atomic_path
from ..regimes import REGIMES
from ..train import PAPER_DEFAULTS, TrainConfig, train_many
from .common import Env, mean_std, present, publish, run_record

ROWS = {
    "fc-sgd": ("fc", "sgd", "mnist"),
    "fc-adam": ("fc", "adam", "mnist"),
    "vconv-sgd": ("vconv", "sgd", "cifar10"),
    "vconv-adam": ("vconv", "adam", "cifar10"),
    "gconv-sgd": ("gconv", "sgd", "cifar10"),
    "gconv-adam": ("gconv", "adam", "cifar10"),
}
ORDER = ("frnpf-ii", "frnpf-di", "dlnpf", "flnpf", "relu")  # the paper's column order
# The authors' table (arXiv 2006.10529): test accuracy %, mean and std over 5 runs, columns in ORDER;
# PAPER[row][regime] = (mean %, std %)
_PAPER_TABLE = """
fc-sgd      95.85 0.10   95.85 0.17   97.86 0.11   97.10 0.09   97.85 0.09
fc-adam     96.02 0.13   96.09 0.12   98.22 0.05   97.82 0.02   98.14 0.07
vconv-sgd   58.92 0.62   58.83 0.27   63.21 0.07   63.06 0.73   67.02 0.43
vconv-adam  64.86 1.18   64.68 0.84   69.45 0.76   71.40 0.47   72.43 0.54
gconv-sgd   67.36 0.56   66.86 0.44   74.57 0.43   78.52 0.39   78.90 0.37
gconv-adam  67.09 0.58   67.08 0.27   77.12 0.19   79.68 0.32   80.32 0.35
"""
PAPER = {
    row: {reg: (float(v[2 * i]), float(v[2 * i + 1])) for i, reg in enumerate(ORDER)}
    for row, *v in (line.split() for line in _PAPER_TABLE.strip().splitlines())
}
BUDGETS = ("quick", "cpu", "paper")
# Budgets other than 'paper' change only how much is trained (epochs, training images, width), never the optimiser,
# learning rate or batch; every table header says which, and "NOT the paper's budget".
# quick: what 2 CPU cores do in minutes (a pipeline check for conv rows: near chance).
# cpu: a conv row in 3-6 hours on 2 CPU cores beside another job (measured, sessions 6-8), chosen from the
#      measured budget curve (`reproduce budget`, docs/RESULTS.md); FC rows at the paper's budget (they fit).
BUDGET_SETTINGS = {
    "quick": {
        "fc": dict(epochs=5),
        "vconv": dict(epochs=2, limit_train=500, limit_test=500),
        "gconv": dict(epochs=2, limit_train=500, limit_test=500),
    },
    "cpu": {
        "fc": dict(),
        "vconv": dict(epochs=12, limit_train=10000, width=0.25),
        "gconv": dict(epochs=12, limit_train=10000, width=0.25),
    },
    "paper": {"fc": dict(), "vconv": dict(), "gconv": dict()},
}


OVERRIDES = ("epochs", "limit_train", "limit_test", "width")


def row_settings(row, budget, epochs=None, limit_train=None, limit_test=None, width=None):
    """Settings of a row under a budget and overrides: arch, optimizer, dataset, lr, epochs, limit_train,
    limit_test, width (the conv width multiplier) and the resulting channels/hidden."""
    check_choice("row", row, tuple(ROWS))
    check_choice("budget", budget, BUDGETS)
    arch, opt, data = ROWS[row]
    lr, ep = PAPER_DEFAULTS[(arch, opt)]
    b = BUDGET_SETTINGS[budget][arch]
    for k, v in (("epochs", epochs), ("limit_train", limit_train), ("limit_test", limit_test)):
        if v is not None:  # 0 is a request, not "the budget's value" (it used to fall back to it silently)
            check_positive_int(f"--{k.replace('_', '-')}", v)
    if width is not None and (isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width <= 1):
        raise NeuralpathError(f"--width {width!r} must be a multiplier in (0, 1] of the paper's conv widths")
    if width is not None and arch == "fc":  # FC rows keep the paper's 6x128: the multiplier would be ignored
        raise NeuralpathError(
            f"--width multiplies the conv rows' widths only; row {row!r} is fully connected: run it without --width"
        )
    st: dict[str, Any] = dict(
        arch=arch,
        optimizer=opt,
        dataset=data,
        lr=lr,
        epochs=b.get("epochs", ep) if epochs is None else epochs,
        limit_train=b.get("limit_train") if limit_train is None else limit_train,
        limit_test=b.get("limit_test") if limit_test is None else limit_test,
        width=b.get("width", 1.0) if width is None else width,
        channels=None,
        hidden=None,
    )
    if arch != "fc" and st["width"] != 1.0:
        from .budget import conv_widths

        st["channels"], st["hidden"] = conv_widths(st["width"])
    return st


def _lock(path):
    from filelock import FileLock

    return FileLock(str(path))


def _clean_source_differs(rdir, seed) -> bool:
    """Whether the ReLU run's best epoch on the even test half (the clean protocol's FLNPF source) differs from its
    best epoch on the whole test set (the authors' FLNPF source)."""
    r = json.loads((rdir / f"relu-s{seed}" / "result.json").read_text())
    return r["best_even_epoch"] != r["best_epoch"]


def run_row(row, st, seeds, out, env: Env, *, stacked=True, regimes=None, compile_dlnpf=False):
    """Train the 5 regimes (or the subset ``regimes``) x ``seeds`` of one row with settings ``st``
    (:func:`row_settings`). Phase 1: ReLU, FRNPF-II, FRNPF-DI, DLNPF. Phase 2: FLNPF on the same seed's ReLU gates
    from its best test epoch (the authors' protocol), and, where the ReLU run's best epoch on the even test half
    differs, a second FLNPF run on those gates ('flnpf-clean', the clean column's source)."""
    rdir = Path(out) / "runs" / row
    rdir.mkdir(parents=True, exist_ok=True)

    common = {k: v for k, v in st.items() if k != "width"}  # the row's TrainConfig fields (width: its channels)

    def cfg(regime, seed):
        c = TrainConfig(
            regime=regime.removesuffix("-clean"), seed=seed, data_root=env.data_root, device=env.device, **common
        )
        c.compile = compile_dlnpf and regime == "dlnpf"
        if regime.startswith("flnpf"):
            src = "best_even.pt" if regime.endswith("-clean") else "best.pt"
            c.relu_checkpoint = str(rdir / f"relu-s{seed}" / src)
        return c

    regimes = list(regimes or REGIMES)
    first = [(r, s) for r in ("relu", "frnpf-ii", "frnpf-di", "dlnpf") if r in regimes for s in seeds]
    with _lock(rdir / ".lock"):
        for phase in ("phase1", "phase2"):
            runs = (
                first
                if phase == "phase1"
                else (
                    [("flnpf", s) for s in seeds]
                    + [("flnpf-clean", s) for s in seeds if _clean_source_differs(rdir, s)]
                    if "flnpf" in regimes
                    else []
                )
            )
            if not runs:
                continue
            cfgs = [cfg(r, s) for r, s in runs]
            outs = [rdir / f"{r}-s{s}" for r, s in runs]
            if stacked:
                left = sum(not (o / "result.json").exists() for o in outs)
                env.log(f"{row}: {left} of {len(runs)} runs left to train, as one stack ({phase})")
                train_many(cfgs, outs, rdir / f"stack-{phase}.pt", resume=True, progress=env.progress, log=env.log)
            else:
                for c, o in zip(cfgs, outs):
                    train_many([c], [o], o / "last.pt", resume=True, progress=env.progress, log=env.log)
    return st


def collect(out):
    """Every finished run under ``out`` as a record; also rewrites ``out/runs.jsonl`` (atomically)."""
    recs = []
    for res in sorted((Path(out) / "runs").glob("*/*/result.json")):
        recs.append(
            run_record(
                res,
                "lr",
                "limit_train",
                "limit_test",
                "channels",
                "hidden",
                row=res.parent.parent.name,
                variant="clean-source" if res.parent.name.startswith("flnpf-clean") else "headline",
                run=str(res.parent.relative_to(Path(out))),
            )
        )
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
            rs = [r for r in recs if r["row"] == row and r["regime"] == reg and r.get("variant") != "clean-source"]
            clean = {r["seed"]: r["clean_test_acc"] for r in rs}
            # FLNPF's clean column: the run on the ReLU gates chosen on the even half, where that run exists
            clean.update(
                {
                    r["seed"]: r["clean_test_acc"]
                    for r in recs
                    if r["row"] == row
                    and r["regime"] == reg
                    and r.get("variant") == "clean-source"
                    and r["seed"] in clean
                }
            )
            out[row][reg] = dict(
                n=len(rs),
                best=_ms([r["best_test_acc"] for r in rs]),
                final=_ms([r["final_test_acc"] for r in rs]),
                clean=_ms(list(clean.values())),
            )
    return out


def _fmt(ms):
    return "—" if ms[0] is None else f"{ms[0]:.2f}±{ms[1]:.2f}"


def settings_from_records(recs) -> dict:
    """row -> the settings its records were trained with (tables are labelled from the records, never from the
    command line; the run folders' identity check makes every run of a row share them)."""
    out = {}
    for r in recs:
        if r["row"] in out:
            continue
        arch, opt, data = ROWS[r["row"]]
        lr, ep = PAPER_DEFAULTS[(arch, opt)]
        ch = r.get("channels")
        paper = (
            r["epochs"] == ep
            and r["lr"] == lr
            and not r["limit_train"]
            and not r["limit_test"]
            and (not ch or list(ch) == [64, 64, 128, 128])
        )
        out[r["row"]] = dict(
            arch=arch,
            optimizer=opt,
            lr=r["lr"],
            epochs=r["epochs"],
            limit_train=r["limit_train"],
            limit_test=r["limit_test"],
            channels=ch,
            hidden=r.get("hidden"),
            data=r.get("data"),
            paper=paper,
        )
    return out


def check_records(recs, where) -> list:
    """Refuse records a table cannot be read from (a hand-edited or foreign runs.jsonl): unknown rows or regimes,
    missing settings, and accuracies that are not fractions in [0, 1] (a percent would print as 9,750%)."""

    def bad(i, r, what):
        who = f"{r.get('row')} {r.get('regime')} seed {r.get('seed')}" if isinstance(r, dict) else ""
        raise NeuralpathError(f"{where}: record {i} ({who}): {what}")

    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict):
            bad(i, r, "is not a JSON object")
        if r.get("row") not in ROWS or r.get("regime") not in ORDER:
            bad(i, r, f"row must be one of {', '.join(ROWS)} and regime one of {', '.join(ORDER)}")
        for k in ("seed", "epochs", "lr", "limit_train", "limit_test", "best_test_acc", "final_test_acc"):
            if k not in r:
                bad(i, r, f"has no {k!r} (records come from `reproduce table` or `report collect`)")
        for k in ("best_test_acc", "final_test_acc", "clean_test_acc"):
            v = r.get(k)
            ok = v is None if k == "clean_test_acc" else False
            if not ok and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1):
                bad(i, r, f"{k}={v!r} must be a fraction in [0, 1] (records keep accuracies as fractions)")
    # Two files appended together would otherwise be averaged silently: a run counted twice, or a row's cells
    # mixing runs of two budgets under the label of the first record's settings.
    seen, row_settings = {}, {}
    for i, r in enumerate(recs, 1):
        key = (r["row"], r["regime"], r["seed"], r.get("variant"))
        if key in seen:
            bad(i, r, f"repeats the run of record {seen[key]} (one record per row, regime, seed and variant)")
        seen[key] = i
        mine = {k: r.get(k) for k in ROW_SETTINGS}
        first = row_settings.setdefault(r["row"], (i, mine))
        diff = [f"{k}={mine[k]!r} here vs {first[1][k]!r} there" for k in ROW_SETTINGS if mine[k] != first[1][k]]
        if diff:
            bad(i, r, f"was trained with other settings than record {first[0]} of its row ({', '.join(diff)}); "
                "a table averages runs of one setting only")  # fmt: skip
    return recs


# The settings every run of one row shares (a row's table label is read from them).
ROW_SETTINGS = ("epochs", "lr", "limit_train", "limit_test", "channels", "hidden", "data")


def table_markdown(recs, rows=None, title_note="") -> str:
    """The side-by-side table from run records alone."""
    rows = present(rows or ROWS, recs, "row")
    settings = settings_from_records(recs)
    summary = summarise(recs, rows)
    seeds = sorted({r["seed"] for r in recs})
    lines = [f"# The paper's table: ours (seeds {seeds}) beside the authors'{title_note}", ""]
    for row in rows:
        st = settings[row]
        lim = (
            "full training split"
            if not st["limit_train"]
            else f"stratified subset of {st['limit_train']} training images"
        )
        tl = "full test split" if not st["limit_test"] else f"stratified subset of {st['limit_test']} test images"
        wd = "" if not st["channels"] or st["paper"] else f", channels {st['channels']}, dense {st['hidden']}"
        lines.append(
            f"- **{row}**: {st['optimizer']} lr {st['lr']:g}, {st['epochs']} epochs, batch 32, {lim}, {tl}"
            f"{wd}; data: {st['data']}" + ("" if st["paper"] else " — NOT the paper's budget")
        )
    lines += [
        "",
        "Test accuracy %, mean ± population std over seeds. best = best test epoch (the authors' protocol); "
        "clean = epoch chosen on the even half of the test set, reported on the odd half (FLNPF: on gates "
        "of the ReLU epoch chosen the same way); Δ = ours(best) − paper.",
        "",
        "| row | regime | paper | ours best | Δ | ours clean | ours final | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for reg in ORDER:
            s = summary[row][reg]
            p = PAPER[row][reg]
            d = "—" if s["best"][0] is None else f"{s['best'][0] - p[0]:+.2f}"
            lines.append(
                f"| {row} | {reg.upper()} | {p[0]:.2f}±{p[1]:.2f} | {_fmt(s['best'])} | {d} | "
                f"{_fmt(s['clean'])} | {_fmt(s['final'])} | {s['n']} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary, rows, path):
    from .common import pyplot

    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        x = np.arange(len(ORDER))
        ours = [summary[row][r]["best"] for r in ORDER]
        paper = [PAPER[row][r] for r in ORDER]
        ax.bar(
            x - 0.2,
            [p[0] for p in paper],
            0.4,
            yerr=[p[1] for p in paper],
            label="paper",
            color="#bbbbbb",
            hatch="//",
            edgecolor="#666666",
        )
        ax.bar(x + 0.2, [o[0] or 0 for o in ours], 0.4, yerr=[o[1] or 0 for o in ours], label="ours", color="#1f77b4")
        vals = [p[0] for p in paper] + [o[0] for o in ours if o[0] is not None]
        lo = max(0.0, min(vals) - 5)
        ax.set_ylim(lo, min(100.0, max(vals) + 2))
        ax.set_xticks(x, [r.upper() for r in ORDER], rotation=30, fontsize=8)
        ax.set_title(row)
        ax.set_ylabel("test accuracy %")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()  # above the bars, where it hides none of them
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(
    out,
    rows=None,
    seeds=2,
    budget="quick",
    *,
    overrides=None,
    stacked=True,
    regimes=None,
    compile_dlnpf=False,
    env=None,
) -> str:
    """Train and report ``rows`` x the five regimes (or ``regimes``) x ``seeds`` under ``budget``; ``overrides``
    changes the budget's epochs, limit_train, limit_test or width (dict); ``stacked=False`` trains one run at a
    time; ``compile_dlnpf``: torch.compile the DLNPF runs' training forward (conv rows). Writes records, table.md
    and table.png under ``out``; returns the markdown."""
    env = env or Env()
    overrides = dict(overrides or {})
    for k in overrides:
        check_choice("override", k, OVERRIDES)
    rows = list(rows or ROWS)
    for r in rows:
        check_choice("row", r, tuple(ROWS))
    regimes = list(regimes or REGIMES)
    for r in regimes:
        check_choice("regime", r, tuple(REGIMES))
    if "flnpf" in regimes and "relu" not in regimes:
        raise NeuralpathError(
            "--regimes has flnpf without relu: FLNPF takes its gates from the same seed's ReLU run; add relu"
        )
    if isinstance(seeds, int):
        if seeds < 1:
            raise NeuralpathError(f"seeds={seeds!r} must be >= 1")
        seeds = list(range(seeds))
    check_choice("budget", budget, BUDGETS)
    if compile_dlnpf and ("dlnpf" not in regimes or any(ROWS[r][0] == "fc" for r in rows)):
        raise NeuralpathError(
            "--compile compiles the DLNPF runs of conv rows: give conv rows only (FC stacks are batched already) "
            "and keep dlnpf in --regimes"
        )
    settings = {row: row_settings(row, budget, **overrides) for row in rows}  # every request checked before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for row in rows:
        env.log(f"row {row}: {len(regimes)} regimes x {len(seeds)} seeds ({budget} budget)")
        run_row(row, settings[row], seeds, out, env, stacked=stacked, regimes=regimes, compile_dlnpf=compile_dlnpf)
    recs = [r for r in collect(out) if r["row"] in rows and r["seed"] in seeds]
    summary = summarise(recs, rows)
    return publish(
        out, "table", table_markdown(recs, rows), t0, out / "runs.jsonl", lambda png: plot(summary, rows, png)
    )
