"""The vectorised ensemble trains each run exactly as train.train would, resumes exactly, and feeds the table."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from neuralpath import datasets
from neuralpath.ensemble import FCEnsemble, train_ensemble
from neuralpath.errors import NeuralpathError
from neuralpath.regimes import build_regime
from neuralpath.train import TrainConfig, train

from conftest import REPO

KW = dict(arch="fc", dataset="synthetic", optimizer="adam", lr=3e-3, epochs=2, width=16, depth=4, device="cpu",
          extra={"shape": [1, 6, 6]})
RUNS = [("relu", 0), ("frnpf-ii", 1), ("frnpf-di", 0), ("dlnpf", 2), ("relu", 1)]


def _cfgs(**over):
    return [TrainConfig(regime=r, seed=s, **dict(KW, **over)) for r, s in RUNS]


@pytest.mark.parametrize("over", [{}, {"limit_train": 500, "val_split": 0.2}, {"optimizer": "sgd", "lr": 0.05}])
def test_ensemble_equals_run_by_run(tmp_path, over):
    cfgs = _cfgs(**over)
    ens = train_ensemble(cfgs, [tmp_path / f"e{i}" for i in range(len(cfgs))], tmp_path / "ens.pt", progress=False)
    for i, c in enumerate(cfgs):
        one = train(c, tmp_path / f"s{i}", progress=False)
        assert ens[i]["best_epoch"] == one["best_epoch"]
        assert ens[i]["best_test_acc"] == pytest.approx(one["best_test_acc"], abs=1e-12)
        if "val_split" in over:
            assert ens[i]["best_val_acc"] == pytest.approx(one["best_val_acc"], abs=1e-12)
        a = torch.load(tmp_path / f"e{i}" / "best.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / f"s{i}" / "best.pt", weights_only=True)["model"]
        assert sorted(a) == sorted(b)
        for k in b:  # float32 rounding of the batched products only
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        ra = [json.loads(x) for x in (tmp_path / f"e{i}" / "metrics.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (tmp_path / f"s{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-4)


def test_forward_matches_each_network_float64():
    x = torch.randn(7, 36, dtype=torch.float64)
    nets = [build_regime(r, "fc", s, None, in_shape=(1, 6, 6), width=16, depth=4)[0].double() for r, s in RUNS]
    order = sorted(range(len(RUNS)), key=lambda i: {"relu": 0, "dlnpf": 2}.get(RUNS[i][0], 1))
    nets = [nets[i] for i in order]
    ens = FCEnsemble(nets, [RUNS[i][0] for i in order])
    out = ens.forward(x)
    per_run = ens.forward(x.expand(len(nets), -1, -1).contiguous())
    table = ens.frozen_gate_table(x)
    cached = ens.forward(x.expand(len(nets), -1, -1).contiguous(), table[:, :].expand(-1, -1, -1, -1))
    for r, net in enumerate(nets):
        ref = net(x)
        torch.testing.assert_close(out[r], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_run[r], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cached[r], ref, rtol=1e-12, atol=1e-12)


def test_ensemble_rejects_mixed_settings(tmp_path):
    a = TrainConfig(regime="relu", **KW)
    b = TrainConfig(regime="dlnpf", **dict(KW, lr=1e-2))
    with pytest.raises(NeuralpathError, match="must share lr"):
        train_ensemble([a, b], [tmp_path / "a", tmp_path / "b"], tmp_path / "e.pt")
    c = TrainConfig(regime="relu", **dict(KW, arch="gconv"))
    with pytest.raises(NeuralpathError, match="'fc' only"):
        train_ensemble([c], [tmp_path / "c"], tmp_path / "e.pt")


def test_more_seeds_after_a_finished_ensemble(tmp_path):
    """`--seeds 1` then `--seeds 2` on one folder: the finished ensemble's checkpoint is left behind and must not
    block the new runs; an unfinished ensemble's checkpoint must (its runs would be lost)."""
    one = [TrainConfig(regime="relu", seed=0, **KW)]
    outs = [tmp_path / "relu-s0"]
    train_ensemble(one, outs, tmp_path / "ens.pt", progress=False)
    more = one + [TrainConfig(regime="relu", seed=1, **KW)]
    res = train_ensemble(more, outs + [tmp_path / "relu-s1"], tmp_path / "ens.pt", progress=False)
    alone = train(more[1], tmp_path / "alone", progress=False)
    assert res[1]["best_test_acc"] == pytest.approx(alone["best_test_acc"], abs=1e-12)
    (tmp_path / "relu-s1" / "result.json").unlink()  # as if the seed-1 ensemble had been killed
    with pytest.raises(NeuralpathError, match="another, unfinished set of runs"):
        train_ensemble([TrainConfig(regime="relu", seed=2, **KW)], [tmp_path / "relu-s2"], tmp_path / "ens.pt",
                       progress=False)


SCRIPT = r"""
import sys
from neuralpath.train import TrainConfig
from neuralpath.ensemble import train_ensemble
KW = dict(arch="fc", dataset="synthetic", optimizer="adam", lr=3e-3, epochs=60, width=64, depth=4, device="cpu",
          extra={"shape": [1, 16, 16]})
out = sys.argv[1]
cfgs = [TrainConfig(regime=r, seed=s, **KW) for r, s in [("relu", 0), ("frnpf-ii", 1), ("dlnpf", 2)]]
train_ensemble(cfgs, [f"{out}/r{i}" for i in range(3)], f"{out}/ens.pt", progress=False)
"""


def test_killed_ensemble_resumes_to_the_same_result(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", SCRIPT, str(ref)], check=True, env=env, timeout=300)
    k = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(k)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two epochs are checkpointed
        m = k / "r0" / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (k / "r0" / "result.json").exists()
    subprocess.run([sys.executable, "-c", SCRIPT, str(k)], check=True, env=env, timeout=300)
    for i in range(3):
        a = json.loads((ref / f"r{i}" / "result.json").read_text())
        b = json.loads((k / f"r{i}" / "result.json").read_text())
        assert (a["best_test_acc"], a["best_epoch"], a["final_test_acc"]) == (b["best_test_acc"], b["best_epoch"],
                                                                              b["final_test_acc"])
        ma = torch.load(ref / f"r{i}" / "best.pt", weights_only=True)["model"]
        mb = torch.load(k / f"r{i}" / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(ma[x], mb[x]) for x in ma)


def test_table_cli_on_real_mnist(mnist_root, tmp_path, cli):
    out = tmp_path / "t"
    r = cli("reproduce", "table", "--rows", "fc-adam", "--epochs", "1", "--seeds", "2", "--limit-train", "2000",
            "--limit-test", "1000", "--data-root", mnist_root, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "| fc-adam | RELU | 98.14±0.07 |" in r.stdout and "NOT the paper's budget" in r.stdout
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and {x["regime"] for x in recs} == {"relu", "dlnpf", "flnpf", "frnpf-ii", "frnpf-di"}
    assert all(0.1 < x["best_test_acc"] <= 1 for x in recs)
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG" and (out / "table.md").exists()
    flnpf = json.loads((out / "runs" / "fc-adam" / "flnpf-s1" / "config.json").read_text())
    assert flnpf["relu_checkpoint"].endswith("relu-s1/best.pt")
    # rerun: everything is finished, so nothing is retrained and the table is the same
    t = time.time()
    r2 = cli("reproduce", "table", "--rows", "fc-adam", "--epochs", "1", "--seeds", "2", "--limit-train", "2000",
             "--limit-test", "1000", "--data-root", mnist_root, "--out", out)
    assert r2.returncode == 0 and r2.stdout.split("Wall time")[0] == r.stdout.split("Wall time")[0]
    assert time.time() - t < 60


def test_table_rejects_bad_rows(cli, tmp_path):
    r = cli("reproduce", "table", "--rows", "fc-rmsprop", "--out", tmp_path)
    assert r.returncode == 1 and "row" in r.stderr and "fc-adam" in r.stderr and "Traceback" not in r.stderr


def test_stratified_subsets_match_between_trainers():
    y = datasets.synthetic("train", n=1000, shape=(1, 4, 4))[1]
    from neuralpath.train import train_val_indices
    tr, va = train_val_indices(TrainConfig(limit_train=300, val_split=0.1, seed=3), y)
    assert len(tr) + len(va) == 300 and not set(tr.tolist()) & set(va.tolist())
