"""The committed records under docs/results regenerate the tables in docs/RESULTS.md (no training): the report step
works from records alone, and the numbers quoted in the docs are the records' numbers."""

import json
import shutil

import pytest
from conftest import REPO

RESULTS = REPO / "docs" / "results"


def _copy(tmp_path, name):
    if not (RESULTS / name).is_dir():
        pytest.skip(f"docs/results/{name} not committed")
    dst = tmp_path / name
    shutil.copytree(RESULTS / name, dst)
    return dst


def test_budget_curve_from_records(tmp_path):
    from neuralpath.experiments import budget

    recs = budget.collect(_copy(tmp_path, "budget"))
    md = budget.report(recs)
    row = next(x for x in md.splitlines() if x.startswith("| 0.25 | 10000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "120" and cells[3] == "53.72" and cells[4] == "52.79" and cells[6] == "104", row
    assert cells[8] == "55.25", row  # FLNPF on the ReLU net's best gates, 120 epochs (session 9)
    row = next(x for x in md.splitlines() if x.startswith("| 0.125 | 10000 |"))  # x1/8, 150 epochs (session 10)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["150", "46.72", "47.56", "-0.84", "—"], row
    row = next(x for x in md.splitlines() if x.startswith("| 0.25 | 5000 |"))  # x1/4, 5,000 images (sessions 10-12)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["100", "43.71", "48.37", "-4.66", "—"], row
    row = next(x for x in md.splitlines() if x.startswith("| 0.25 | 20000 |"))  # x1/4, 20,000 images (session 12)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["40", "52.73", "52.99", "-0.26", "—"], row
    row = next(x for x in md.splitlines() if x.startswith("| 0.5 | 10000 |"))  # x1/2, 20 epochs (sessions 13-14)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["20", "45.74", "50.53", "-4.79", "—"], row
    assert cells[8] == "53.45", row  # FLNPF on that ReLU net's best gates, 20 epochs (session 14)
    budget.plot(recs, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    assert "passes FRNPF-II for good at **epoch 104**" in doc and "FLNPF ends at **55.25%**" in doc
    assert "| gap ReLU − FRNPF-II (points) | −4.66 | −6.11 | −4.82 | −3.77 | −2.24 | −1.34 | −0.84 |" in doc
    assert "| gap ReLU − FRNPF-II (points) | −7.27 | −9.85 | −8.17 | −5.86 | −5.81 | −4.66 |" in doc
    assert "| gap ReLU − FRNPF-II (points) | −6.97 | −6.64 | −6.61 | −4.39 | −1.98 | −0.26 |" in doc


def test_budget_seeds_of_the_half_width_point_from_records(tmp_path):
    """The x1/2, 10,000-image point's other seeds (docs/results/budget-seed*): each seed's row regenerates from its
    records, and the means over all seeds quoted in RESULTS.md are those of the records."""
    import statistics
    from decimal import ROUND_HALF_UP, Decimal

    from neuralpath.experiments import budget

    folders = {0: "budget", **{int(d.name.removeprefix("budget-seed")): d.name for d in RESULTS.glob("budget-seed*")}}
    if len(folders) < 2:
        pytest.skip("no second seed committed")
    best: dict[str, list[float]] = {"relu": [], "frnpf-ii": [], "flnpf": []}
    for seed, name in sorted(folders.items()):
        recs = [r for r in budget.collect(_copy(tmp_path, name)) if r["width"] == 0.5 and r["n_train"] == 10000]
        assert {r["seed"] for r in recs} == {seed}, name
        assert all(r["finished"] and r["data"] for r in recs), name
        for regime, accs in best.items():
            last = [r for r in recs if r["regime"] == regime]
            assert len(last) == 20, (name, regime)  # 20 epochs each
            accs.append(round(100 * last[-1]["best_so_far"], 2))
        if seed:
            md = budget.report(recs)
            row = next(x for x in md.splitlines() if x.startswith("| 0.5 | 10000 |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[3:5] == [f"{best['relu'][-1]:.2f}", f"{best['frnpf-ii'][-1]:.2f}"] and f"seed {seed}" in md
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    n = len(folders)
    for regime, accs in best.items():
        exact = [Decimal(f"{a:.2f}") for a in accs]  # the percentages are multiples of 0.01 (10,000 test images)
        mean = (sum(exact) / len(exact)).quantize(Decimal("0.01"), ROUND_HALF_UP)
        cell = f"{mean} ± {statistics.pstdev(accs):.2f}"
        assert cell in doc, (regime, cell, n)
    assert f"n = {n})" in doc


def test_dlgn_table_from_records(tmp_path):
    from neuralpath.experiments import dlgn

    d = _copy(tmp_path, "dlgn")
    recs = dlgn.collect(d)
    md = dlgn.report(recs, "cpu", dict(dlgn.BUDGETS["cpu"]))
    committed = (RESULTS / "dlgn" / "dlgn.md").read_text()
    table = [x for x in md.splitlines() if x.startswith("| ")]
    assert table and table == [x for x in committed.splitlines() if x.startswith("| ")]
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    for cell in ("96.29 ± 0.19", "95.81 ± 0.08", "70.99 ± 0.84", "98.28 ± 0.09", "70.47 ± 0.95"):
        assert cell in md and cell in doc


def test_nu_from_records(tmp_path):
    from neuralpath.experiments import nu
    from neuralpath.io import read_jsonl

    recs = read_jsonl(_copy(tmp_path, "nu-paper") / "nu.jsonl")
    ser = nu.series(recs, 5, 50)
    first, last = ser[0], ser[-1]
    assert (first[0], round(first[1], -1), round(first[2])) == (0, 17360, 812)  # RESULTS.md: 17,360 ± 812
    assert (last[0], round(last[1]), round(last[2])) == (50, 7826, 311)  # 7,826 ± 311
    assert all(s[4] == 5 for s in ser)
    assert "17,360 ± 812" in (REPO / "docs" / "RESULTS.md").read_text()


def test_conv_dlgn_from_records(tmp_path):
    import json

    from neuralpath.experiments import dlgn

    d = _copy(tmp_path, "dlgn-cifar")
    recs = [json.loads(x) for x in (d / "dlgn-cifar.jsonl").read_text().splitlines()]
    acc = {(r["model"], r["seed"]): 100 * r["best_test_acc"] for r in recs}
    ratios = [acc[("dlgn", s)] / acc[("relu", s)] for s in range(3)]
    assert [round(100 * x, 1) for x in ratios] == [110.4, 114.4, 123.6]
    dlgn.plot_cifar(d, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_fc_adam_rerun_from_records(tmp_path):
    from neuralpath.experiments import table

    recs = table.collect(_copy(tmp_path, "paper-fc-adam"))
    s = table.summarise(recs, ["fc-adam"])["fc-adam"]
    cells = {reg: (table._fmt(s[reg]["best"]), table._fmt(s[reg]["clean"]), s[reg]["n"]) for reg in ("relu", "flnpf")}
    assert cells == {"relu": ("98.14±0.04", "97.93±0.08", 5), "flnpf": ("97.77±0.07", "97.55±0.15", 5)}, cells
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    assert "| FLNPF | 97.82±0.02 | **97.77±0.07** | -0.05 | 97.55±0.15 | 97.70±0.09 |" in doc
    assert "| RELU | 98.14±0.07 | **98.14±0.04** | +0.00 | 97.93±0.08 | 97.85±0.17 |" in doc


def test_fc_sgd_paper_row_from_records(tmp_path):
    """The fc-sgd row at the paper's budget (5 seeds, 300 epochs; session 11): every cell from the committed records,
    quoted in RESULTS, and each mean within 1 point of the paper's."""
    from neuralpath.experiments import table

    recs = table.collect(_copy(tmp_path, "paper-fc-sgd"))
    s = table.summarise(recs, ["fc-sgd"])["fc-sgd"]
    want = {
        "frnpf-ii": ("95.80±0.20", "95.74±0.25", "95.72±0.22", 95.85),
        "frnpf-di": ("95.97±0.27", "95.90±0.22", "95.80±0.25", 95.85),
        "dlnpf": ("98.01±0.07", "97.80±0.13", "97.91±0.06", 97.86),
        "flnpf": ("97.24±0.09", "96.91±0.17", "97.13±0.11", 97.10),
        "relu": ("97.87±0.08", "97.56±0.07", "97.81±0.09", 97.85),
    }
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    for reg, (best, clean, final, paper) in want.items():
        got = tuple(table._fmt(s[reg][k]) for k in ("best", "clean", "final"))
        assert got == (best, clean, final) and s[reg]["n"] == 5, (reg, got)
        assert abs(s[reg]["best"][0] - paper) <= 1.0
        assert f"**{best}** | {s[reg]['best'][0] - paper:+.2f} | {clean} | {final} |" in doc, reg


def test_ntk_split_report_and_plot_from_records(tmp_path):
    from neuralpath.experiments import ntk_split
    from neuralpath.io import read_jsonl

    d = _copy(tmp_path, "ntk-split")
    recs = sorted(read_jsonl(d / "ntk_split.jsonl"), key=lambda r: r["epoch"])
    md = ntk_split.report(recs, "quick", 10, 6000, 0, 0.9208)
    committed = (d / "ntk_split.md").read_text()
    assert md.splitlines() == committed.splitlines()[: len(md.splitlines())]  # all but the wall-time line
    ntk_split.plot(recs, tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"


def test_kernels_report_and_plot_from_records(tmp_path):
    from neuralpath.experiments import kernel_machines as km
    from neuralpath.io import read_jsonl

    d = _copy(tmp_path, "kernels")
    recs = read_jsonl(d / "kernels.jsonl")
    net_acc = {r["epoch"]: r["test_acc"] for r in read_jsonl(d / "relu" / "metrics.jsonl")}
    stages = [("npk-inf", 0), ("npk", 0), ("npk", 1), ("npk", 2), ("npk", 3), ("ntk", 3)]
    committed = (d / "kernels.md").read_text().splitlines()
    md = km.report(recs, stages, net_acc, committed[0]).splitlines()
    assert md == committed[: len(md)]  # the table; the committed file adds the wall-time line
    assert any(x.startswith("| NPK-INF | ∞ width | 97.15 |") for x in md)  # RESULTS.md: KRR 97.15% at infinite width
    km.plot(recs, net_acc, tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_resnet_table_from_records(tmp_path):
    from neuralpath.experiments import resnet

    d = _copy(tmp_path, "resnet")
    recs = resnet.collect(d)
    md = resnet.report(recs, "cpu", dict(resnet.BUDGETS["cpu"]), "CIFAR-10 (JPEG copy)")
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    for cell in ("46.36 ± 0.97", "49.84 ± 0.62", "42.06 ± 0.69", "| 40.45 |", "| 48.55 |"):
        assert cell in md, cell
        assert cell.strip("| ") in doc, cell
    resnet.plot(recs, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def _check_cpu_row(tmp_path, row, want):
    """Every (best, clean) cell of a conv row at the cpu budget, from the committed records and quoted in RESULTS."""
    from neuralpath.experiments import table

    recs = table.collect(_copy(tmp_path, "table-cpu"))
    s = table.summarise(recs, [row])[row]
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    for reg, (best, clean) in want.items():
        got = (table._fmt(s[reg]["best"]), table._fmt(s[reg]["clean"]), s[reg]["n"])
        assert got == (best, clean, 3), (reg, got)
        assert best in doc and clean in doc


def test_conv_cpu_rows_from_records(tmp_path):
    want = {
        "frnpf-ii": ("42.73±1.15", "43.39±1.24"),
        "frnpf-di": ("41.61±0.62", "41.98±0.96"),
        "dlnpf": ("39.31±0.23", "39.83±0.17"),
        "flnpf": ("41.12±0.72", "41.37±0.86"),
        "relu": ("34.31±0.45", "34.35±0.88"),
    }
    _check_cpu_row(tmp_path, "gconv-adam", want)


def test_vconv_cpu_row_from_records(tmp_path):
    """The VCONV-Adam row at the cpu budget (session 8)."""
    want = {
        "frnpf-ii": ("46.52±0.77", "46.93±0.89"),
        "frnpf-di": ("46.71±1.31", "46.85±0.92"),
        "dlnpf": ("51.58±0.30", "51.85±0.49"),
        "flnpf": ("50.95±0.75", "51.75±1.25"),
        "relu": ("54.85±0.48", "54.90±0.94"),
    }
    _check_cpu_row(tmp_path, "vconv-adam", want)


def test_continuous_gconv_cpu_from_records(tmp_path):
    """Continuous NPF learning on GCONV at the cpu budget (3 seeds, session 9): the stage table from the committed
    records, the numbers RESULTS.md quotes, and the engine check it states: stages 0 and 3 repeat the conv table's
    FRNPF-II and FLNPF requests and their metrics are identical epoch by epoch (timings aside)."""
    from neuralpath.experiments import continuous
    from neuralpath.io import read_jsonl

    d = _copy(tmp_path, "continuous-cpu")
    recs = continuous.collect(d)
    stats = {k: (f"{b[0]:.2f} ± {b[1]:.2f}", n) for k, b, _, n in continuous.stage_stats(recs)}
    want = {0: "42.73 ± 1.15", 1: "39.09 ± 0.79", 2: "39.98 ± 0.62", 3: "41.12 ± 0.72", 4: "42.09 ± 0.36"}
    assert stats == {k: (v, 3) for k, v in want.items()}
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    assert all(v in doc for v in want.values())
    table = RESULTS / "table-cpu" / "runs" / "gconv-adam"
    for stage, regime in ((0, "frnpf-ii"), (3, "flnpf")):
        for s in range(3):
            a, b = (
                read_jsonl(d / f"stage_{stage}-s{s}" / "metrics.jsonl"),
                read_jsonl(table / f"{regime}-s{s}" / "metrics.jsonl"),
            )
            assert [{k: v for k, v in m.items() if k != "seconds"} for m in a] == [
                {k: v for k, v in m.items() if k != "seconds"} for m in b
            ], (stage, s)
    continuous.plot(recs, "cpu", [r["best_test_acc"] for r in recs if r["stage"] == -1], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_kernels_gconv_from_records(tmp_path):
    """KRR on the GCONV NPK of the cpu-budget ReLU nets' initial and trained gates (3 nets, session 9): the
    numbers RESULTS.md quotes, from the committed records."""
    from neuralpath.experiments.common import mean_std
    from neuralpath.io import read_jsonl

    recs = read_jsonl(_copy(tmp_path, "kernels-gconv") / "kernels-run.jsonl")
    acc = {g: [100 * r["test_acc"] for r in recs if r["gates"] == g] for g in ("initial", "trained")}
    got = {g: "{:.2f} ± {:.2f}".format(*mean_std(v)) for g, v in acc.items()}
    assert got == {"initial": "46.10 ± 0.49", "trained": "48.83 ± 0.33"} and len(acc["trained"]) == 3
    by = {(r["run"], r["gates"]): r["test_acc"] for r in recs}
    diffs = sorted(round(100 * (by[(run, "trained")] - by[(run, "initial")]), 2) for run in {r["run"] for r in recs})
    assert diffs == [1.7, 2.8, 3.7]
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    assert all(v in doc for v in got.values()) and "+1.70, +2.80, +3.70" in doc


def test_committed_training_run_configs_are_train_configs():
    """Every committed training run's config.json is exactly a TrainConfig (what resume, load_run and the tables
    read); the nu and DLGN-benchmark experiments keep their own settings files. Session 12 found nine fc-sgd folders
    whose config had gained a key."""
    from neuralpath.train import TrainConfig

    own_schema = {"nu", "nu-paper", "dlgn"}
    paths = [p for p in RESULTS.rglob("config.json") if p.relative_to(RESULTS).parts[0] not in own_schema]
    assert len(paths) > 100
    for p in paths:
        TrainConfig(**json.loads(p.read_text()))
