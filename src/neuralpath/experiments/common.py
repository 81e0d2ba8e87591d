"""Helpers shared by the experiments: records, plots, data with a synthetic fallback."""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import datasets
from ..io import append_jsonl, atomic_path, read_jsonl


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


def savefig(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
