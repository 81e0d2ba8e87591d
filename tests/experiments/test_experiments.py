"""Every `reproduce` sub-command runs end to end at a tiny budget and writes records, a table and a plot."""

import json

from neuralpath.io import read_jsonl


def _png(p):
    return p.read_bytes()[:4] == b"\x89PNG"


def test_reproduce_nu(mnist_root, cli, tmp_path):
    r = cli("reproduce", "nu", "--runs", "1", "--epochs", "2", "--data-root", mnist_root, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(tmp_path / "nu.jsonl")
    assert [x["epoch"] for x in recs] == [0, 2] and all(x["nu"] > 0 and x["jitter"] >= 0 for x in recs)
    assert "| epoch | nu mean" in r.stdout and _png(tmp_path / "nu.png")
    again = cli("reproduce", "nu", "--runs", "1", "--epochs", "2", "--data-root", mnist_root, "--out", tmp_path)
    assert again.returncode == 0 and len(read_jsonl(tmp_path / "nu.jsonl")) == 2  # finished points are skipped


def test_reproduce_ntk_split(mnist_root, cli, tmp_path):
    r = cli("reproduce", "ntk-split", "--epochs", "5", "--data-root", mnist_root, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(tmp_path / "ntk_split.jsonl")
    assert [x["epoch"] for x in recs] == [0, 5]
    for x in recs:  # soft gates: the feature part is a real, non-zero kernel; the logits' NTK (not softmax sums)
        assert x["trace_value"] > 0 and x["trace_feature"] > 0 and 0 < x["align_value"] <= 1
    assert _png(tmp_path / "ntk_split.png")


def test_reproduce_continuous_fc(mnist_root, cli, tmp_path):
    r = cli(
        "reproduce",
        "continuous",
        "--arch",
        "fc",
        "--seeds",
        "2",
        "--stages",
        "2",
        "--step",
        "1",
        "--stage-epochs",
        "1",
        "--limit-train",
        "1000",
        "--data-root",
        mnist_root,
        "--out",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert (
        "| 2 | ReLU best-so-far at epoch 2 |" in r.stdout and "67.09" in r.stdout and _png(tmp_path / "continuous.png")
    )
    recs = read_jsonl(tmp_path / "continuous.jsonl")
    assert sorted((x["stage"], x["seed"]) for x in recs if x["stage"] >= 0) == [
        (k, s) for k in range(3) for s in (0, 1)
    ]
    for s in (0, 1):
        cfg = json.loads((tmp_path / f"stage_2-s{s}" / "config.json").read_text())
        assert cfg["regime"] == "flnpf" and cfg["relu_checkpoint"].endswith(f"relu-s{s}/best_at_2.pt")
        # best-so-far: the checkpoint holds the ReLU epoch with the best test accuracy among epochs 1..2
        m = read_jsonl(tmp_path / f"relu-s{s}" / "metrics.jsonl")
        best = max(m[:2], key=lambda x: x["test_acc"])["epoch"]
        import torch

        assert torch.load(tmp_path / f"relu-s{s}" / "best_at_2.pt", weights_only=True)["epoch"] == best


def test_reproduce_kernels(mnist_root, cli, tmp_path):
    r = cli(
        "reproduce",
        "kernels",
        "--n-train",
        "400",
        "--n-test",
        "200",
        "--epochs",
        "1",
        "--data-root",
        mnist_root,
        "--out",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(tmp_path / "kernels.jsonl")
    assert {(x["kernel"], x["epoch"], x["method"]) for x in recs} == {
        (k, e, m) for k, e in (("npk-inf", 0), ("npk", 0), ("npk", 1), ("ntk", 1)) for m in ("krr", "svm")
    }
    assert all(x["test_acc"] > 0.5 for x in recs) and _png(tmp_path / "kernels.png")


def test_reproduce_kernels_on_several_relu_runs(cli, tmp_path):
    """`reproduce kernels --relu-run A,B`: the NPK of each run's initial and best-epoch gates + KRR on one subset,
    a row per run and mean +- std over the runs; the trained record matches KRR on the NPK of the run's best.pt
    computed here; a run of another regime is refused naming it; a second invocation resumes (nothing recomputed);
    a run named twice and records of other sizes are refused."""
    from neuralpath import checkpoints, datasets
    from neuralpath.kernels.machines import accuracy, fit_predict
    from neuralpath.kernels.npk import npk
    from neuralpath.regimes import build_regime
    from neuralpath.train import TrainConfig, net_kwargs, value_init_seed

    runs = []
    for seed in (0, 1):
        rr = tmp_path / f"relu-s{seed}"
        args = ("--dataset", "synthetic", "--width", "8", "--depth", "3", "--epochs", "2", "--limit-train", "200")
        r = cli("train", *args, "--seed", str(seed), "--out", rr)
        assert r.returncode == 0, r.stderr
        runs.append(str(rr))
    out = tmp_path / "k"
    kw = ("--n-train", "60", "--n-test", "40", "--out", out)
    r = cli("reproduce", "kernels", "--relu-run", ",".join(runs), *kw)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(out / "kernels-run.jsonl")
    assert sorted((x["run"], x["gates"]) for x in recs) == [(rr, g) for rr in runs for g in ("initial", "trained")]
    md = (out / "kernels-run.md").read_text()
    assert "mean ± std (n = 2)" in md and _png(out / "kernels-run.png")
    cfg = TrainConfig(**json.loads((tmp_path / "relu-s1" / "config.json").read_text())).resolved()
    xtr, ytr = datasets.load("synthetic", "train", limit=60, seed=0)
    xte, yte = datasets.load("synthetic", "test", limit=40, seed=0)
    net, _ = build_regime("relu", cfg.arch, value_init_seed("relu", 1), None, **net_kwargs(cfg, xtr.shape[1:], 10))
    net.load_state_dict(checkpoints.load(tmp_path / "relu-s1" / "best.pt")["model"])
    K, Kt = npk(net, xtr).double(), npk(net, xte, xtr).double()
    pred, _ = fit_predict("krr", K, ytr, Kt)
    mine = next(x for x in recs if x["run"] == runs[1] and x["gates"] == "trained")
    assert mine["test_acc"] == accuracy(pred, yte)
    # resumable: the same request finds every record and computes nothing
    r = cli("reproduce", "kernels", "--relu-run", ",".join(runs), *kw)
    assert r.returncode == 0 and len(read_jsonl(out / "kernels-run.jsonl")) == 4
    bad = tmp_path / "flnpf"
    r = cli("train", "--dataset", "synthetic", "--width", "8", "--depth", "3", "--epochs", "1", "--limit-train", "200",
            "--regime", "frnpf-ii", "--out", bad)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("reproduce", "kernels", "--relu-run", f"{runs[0]},{bad}", "--out", tmp_path / "k2")
    assert r.returncode == 1 and "needs a finished ReLU run folder" in r.stderr and "Traceback" not in r.stderr
    # session 10: a run named twice counted twice in the mean +- std; records of other sizes were read as these
    r = cli("reproduce", "kernels", "--relu-run", f"{runs[0]},{runs[0]}/.", "--out", tmp_path / "k3")
    assert r.returncode == 1 and "twice" in r.stderr and not (tmp_path / "k3" / "kernels-run.jsonl").exists()
    r = cli("reproduce", "kernels", "--relu-run", runs[0], "--n-train", "50", "--n-test", "40", "--out", out)
    assert r.returncode == 1 and "holds records made with --n-train 60 --n-test 40" in r.stderr
    assert len(read_jsonl(out / "kernels-run.jsonl")) == 4


def test_reproduce_budget_one_point_of_the_grid(cifar_root, cli, tmp_path):
    """`reproduce budget --points NAME` trains that point of the grid only (ReLU and FRNPF-II stacked, then FLNPF
    on the ReLU net's best gates where the grid says so) and reports every point found under --out; a name not in
    the grid is refused in one line naming the grid's points, before any work."""
    bad = cli("reproduce", "budget", "--grid", "tiny", "--points", "w0.5-n10000", "--out", tmp_path / "x")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "w0.5-n10000 not in the tiny grid; its points are w0.125-n200" in bad.stderr
    assert not (tmp_path / "x").exists()
    args = ("--grid", "tiny", "--points", "w0.125-n200", "--limit-test", "100", "--data-root", cifar_root)
    r = cli("reproduce", "budget", *args, "--seed", "3", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # the report names what the records hold (it said "GCONV ... seed 0" whatever --arch and seed were)
    assert "(GCONV, Adam" in r.stdout and "subset of CIFAR-10 (JPEG copy), seed 3." in r.stdout, r.stdout
    recs = read_jsonl(tmp_path / "curve.jsonl")
    assert {x["seed"] for x in recs} == {3} and {x["data"] for x in recs} == {"CIFAR-10 (JPEG copy)"}
    assert sorted({(x["regime"], x["epoch"]) for x in recs}) == [
        (g, e) for g in ("flnpf", "frnpf-ii", "relu") for e in (1, 2)
    ]
    assert {(x["width"], x["n_train"]) for x in recs} == {(0.125, 200)}
    assert all(x["finished"] for x in recs) and _png(tmp_path / "budget.png")
    assert json.loads((tmp_path / "runs" / "w0.125-n200" / "relu" / "data.json").read_text())["data"] == (
        "CIFAR-10 (JPEG copy)"
    )


def test_reproduce_resnet_quick(cifar_root, cli, tmp_path):
    """`reproduce resnet --budget quick` end to end on the JPEG copy: ReLU and FRNPF-II stacked, FLNPF on the ReLU
    net's best gates, kernel ridge regression on the NPK of its initial and trained gates; records, table, plot."""
    r = cli("reproduce", "resnet", "--budget", "quick", "--data-root", cifar_root, "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = read_jsonl(tmp_path / "resnet.jsonl")
    assert sorted(x["regime"] for x in recs) == ["flnpf", "frnpf-ii", "krr-npk-initial", "krr-npk-trained", "relu"]
    assert all(0.0 <= x["best_test_acc"] <= 1.0 for x in recs)
    flnpf = json.loads((tmp_path / "runs" / "flnpf-s0" / "config.json").read_text())
    assert flnpf["arch"] == "resnet" and flnpf["relu_checkpoint"].endswith("relu-s0/best.pt")
    assert "| RELU |" in r.stdout and "CIFAR-10 (JPEG copy)" in r.stdout and _png(tmp_path / "resnet.png")
