"""Helpers shared by the experiments: records, plots, data with a synthetic fallback."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import datasets
from ..io import append_jsonl, atomic_path, read_jsonl


@dataclass(frozen=True)
class Env:
    """Where an experiment reads its data, the device it computes on and how it reports: every experiment's
    ``run(..., env=Env(...))`` takes one (the CLI builds it from --data-root, --device and the terminal)."""

    data_root: str | None = None
    device: str = "auto"
    progress: bool | None = None  # None: a bar only on a terminal
    log: Callable[[str], object] = print


def budget_settings(budgets: dict, budget: str, **overrides) -> dict:
    """A copy of ``budgets[budget]`` (checked) with the overrides that are not None (each a positive integer,
    named in errors as its CLI flag)."""
    from ..errors import NeuralpathError, check_choice

    check_choice("budget", budget, tuple(budgets))
    b = dict(budgets[budget])
    for k, v in overrides.items():
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NeuralpathError(f"--{k.replace('_', '-')} {v!r} must be a positive integer")
            b[k] = v
    return b


def seeded_fc(width, depth, out_dim, seed, in_dim=784, **kw):
    """An FC DGN (on flattened 28x28 images unless ``in_dim``) drawn from ``torch.Generator().manual_seed(seed)``;
    ``kw`` as :class:`neuralpath.nets.FCDGN`."""
    import torch

    from ..nets import FCDGN

    g = torch.Generator().manual_seed(seed)
    return FCDGN(in_dim=in_dim, width=width, depth=depth, out_dim=out_dim, generator=g, **kw)


def mnist_or_synthetic(split, data_root, limit=None, seed=0):
    """(x, y, label): real MNIST, or synthetic 28x28 data when MNIST is not fetched (labelled as such)."""
    try:
        x, y = datasets.load("mnist", split, root=data_root, limit=limit, seed=seed)
        return x, y, datasets.source_label("mnist", data_root)
    except (FileNotFoundError, ValueError):
        x, y = datasets.synthetic(split, n=limit or 2000, shape=(1, 28, 28), seed=seed)
        return x, y, "synthetic (MNIST not fetched: run `neuralpath data fetch mnist`)"


def write_jsonl(path, records):
    """Write a JSON-lines file atomically (the records behind a table or plot)."""
    import json

    from ..io import write_text

    write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def run_record(result_json, *config_keys, **extra) -> dict:
    """The record of one finished run from its ``result.json``: the accuracies every report uses (best, clean,
    final, best epoch), its budget, time, data and device, the named config keys, and ``extra``."""
    import json

    r = json.loads(Path(result_json).read_text())
    c = r["config"]
    return {
        **{k: c.get(k) for k in ("regime", "seed", *config_keys)},
        "best_test_acc": r["best_test_acc"],
        "best_epoch": r["best_epoch"],
        "final_test_acc": r["final_test_acc"],
        "clean_test_acc": r.get("clean_test_acc"),
        "epochs": c["epochs"],
        "seconds": r.get("seconds"),
        "data": r.get("data"),
        "device": r.get("device"),
        **extra,
    }


def krr_on_npk(net, x_train, y_train, x_test, y_test, normalize=None, **keys) -> dict:
    """Kernel ridge regression on the NPK of ``net``'s gates, in float64: the record (``keys``, the sizes, the test
    accuracy, the kernel's seconds and the solver's choices)."""
    import time

    from ..kernels.machines import accuracy, fit_predict
    from ..kernels.npk import npk

    net, xtr, xte = net.double(), x_train.double(), x_test.double()
    t = time.time()
    K, Kt = npk(net, xtr, normalize=normalize), npk(net, xte, xtr, normalize=normalize)
    pred, info = fit_predict("krr", K, y_train, Kt)
    n, acc = {"n_train": len(y_train), "n_test": len(y_test)}, accuracy(pred, y_test)
    return {**keys, **n, "test_acc": acc, "kernel_seconds": time.time() - t, **info}


def done_keys(path, key):
    """Keys of the records already in a JSON-lines file (resumable experiments skip them)."""
    return {key(r) for r in read_jsonl(path)} if Path(path).exists() else set()


def add(path, rec):
    append_jsonl(path, rec)


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.pstdev(vals)


def fmt_mean_std(vals, scale: float = 1.0) -> str:
    """'mean ± std' of the values that are not None, times ``scale`` (100: fractions as percent), to 2 decimals;
    '—' when there are none."""
    m, s = mean_std([scale * v for v in vals if v is not None])
    return "—" if m is None else f"{m:.2f} ± {s:.2f}"


def savefig(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def present(keys, recs, field) -> list:
    """The ``keys`` (in their order) that some record has as its ``field``: what a report or plot has to show."""
    have = {r.get(field) for r in recs}
    return [k for k in keys if k in have]


def publish(out, name, md, t0, records, draw=None) -> str:
    """An experiment's last step: the report ``md`` with the invocation's wall time (since ``t0``) and where its
    records and plot are, written to out/<name>.md; the plot drawn by ``draw(out/<name>.png)``. Returns the report."""
    import time

    from ..io import write_text

    png = Path(out) / f"{name}.png"
    md += f"\nWall time of this invocation: {time.time() - t0:.0f} s. Records: {records}"
    md += f"; plot: {png}\n" if draw else ".\n"
    write_text(Path(out) / f"{name}.md", md)
    if draw:
        draw(png)
    return md


def subplots(*args, **kw):
    """``plt.subplots`` under the Agg backend (see :func:`pyplot`)."""
    return pyplot().subplots(*args, **kw)


def label_axes(ax, xlabel, ylabel, legend_size=7):
    """The experiments' plot finish: axis labels, a small legend, a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)


def pyplot():
    """matplotlib with the Agg backend (an optional dependency: the [plots] extra; reproduce checks it up front)."""
    try:
        import matplotlib
    except ImportError:
        from ..errors import NeuralpathError

        raise NeuralpathError(
            "the experiments write plots and need matplotlib: pip install 'neuralpath[plots]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
