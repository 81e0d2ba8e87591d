import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from neuralpath import checkpoints
from neuralpath.errors import NeuralpathError
from neuralpath.io import read_jsonl
from neuralpath.train import TrainConfig, train

SMALL = ["--width", "32", "--depth", "3", "--limit-train", "300", "--limit-test", "200", "--epochs", "2"]


def test_every_regime_trains_from_the_cli(mnist_root, tmp_path, cli):
    relu = tmp_path / "relu"
    r = cli("train", "--regime", "relu", "--lr", "1e-3", "--data-root", mnist_root, "--out", relu, *SMALL)
    assert r.returncode == 0, r.stderr
    for regime in ("dlnpf", "flnpf", "frnpf-ii", "frnpf-di"):
        extra = ["--relu-checkpoint", relu] if regime == "flnpf" else []
        out = tmp_path / regime
        r = cli("train", "--regime", regime, "--lr", "1e-3", "--data-root", mnist_root, "--out", out, *SMALL, *extra)
        assert r.returncode == 0, r.stderr
        recs = read_jsonl(out / "metrics.jsonl")
        assert [x["epoch"] for x in recs] == [1, 2]
        assert set(recs[0]) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
        res = json.loads((out / "result.json").read_text())
        assert 0 <= res["best_test_acc"] <= 1 and res["config"]["regime"] == regime
        assert res["best_test_acc"] > 0.3  # learnt something beyond chance (0.1)


def test_flnpf_copies_the_best_relu_epoch(mnist_root, tmp_path):
    relu = train(
        TrainConfig(
            regime="relu",
            width=16,
            depth=3,
            limit_train=200,
            limit_test=100,
            epochs=3,
            data_root=str(mnist_root),
            save_every=1,
        ),
        tmp_path / "r",
        progress=False,
    )
    best = checkpoints.load(tmp_path / "r")
    assert best["epoch"] == relu["best_epoch"]
    train(
        TrainConfig(
            regime="flnpf",
            width=16,
            depth=3,
            limit_train=200,
            limit_test=100,
            epochs=1,
            data_root=str(mnist_root),
            relu_checkpoint=str(tmp_path / "r" / "epoch_1.pt"),
        ),
        tmp_path / "f",
        progress=False,
    )
    f = checkpoints.load(tmp_path / "f" / "last.pt")
    e1 = checkpoints.load(tmp_path / "r" / "epoch_1.pt")
    assert torch.equal(f["model"]["feature_layers.0.weight"], e1["model"]["value_layers.0.weight"])


def test_bad_arguments_fail_before_work(cli, tmp_path):
    for args, msg in (
        (["--regime", "x"], "regime"),
        (["--arch", "mlp"], "arch"),
        (["--width", "0"], "width"),
        (["--epochs", "0"], "epochs"),
        (["--regime", "flnpf"], "relu-checkpoint"),
    ):
        r = cli("train", "--out", tmp_path / "o", "--dataset", "synthetic", *args)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "result.json").exists()


def test_flnpf_refuses_checkpoint_of_another_architecture(tmp_path):
    train(TrainConfig(dataset="synthetic", regime="relu", width=8, depth=3, epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(NeuralpathError, match="width"):
        train(
            TrainConfig(
                dataset="synthetic", regime="flnpf", width=16, depth=3, epochs=1, relu_checkpoint=str(tmp_path / "r")
            ),
            tmp_path / "f",
            progress=False,
        )


def test_sigkill_then_resume_equals_uninterrupted(mnist_root, tmp_path):
    args = [
        "train",
        "--regime",
        "dlnpf",
        "--width",
        "64",
        "--depth",
        "3",
        "--limit-train",
        "3000",
        "--limit-test",
        "500",
        "--epochs",
        "12",
        "--data-root",
        str(mnist_root),
        "--seed",
        "7",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    ref = subprocess.run(
        [sys.executable, "-m", "neuralpath", *args, "--out", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen(
        [sys.executable, "-m", "neuralpath", *args, "--out", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.02)
    # somewhere inside epoch 2: half an epoch of the reference run after epoch 1's checkpoint (a fixed sleep let the
    # whole run finish first on a faster CPU; eleven epochs remain, so the kill always lands before the end)
    seconds = sorted(x["seconds"] for x in read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    time.sleep(seconds[len(seconds) // 2] / 2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "result.json").exists()
    r = subprocess.run(
        [sys.executable, "-m", "neuralpath", *args, "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["final_test_acc"] == b["final_test_acc"] and a["best_test_acc"] == b["best_test_acc"]
    ma, mb = checkpoints.load(tmp_path / "ref" / "last.pt")["model"], checkpoints.load(out / "last.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) if torch.is_tensor(ma[k]) else ma[k] == mb[k] for k in ma)
    assert [x["epoch"] for x in read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_refused(tmp_path, cli):
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Evil(tmp_path / "pwned"), "config": {}}, bad)
    with pytest.raises(NeuralpathError, match="refused"):
        checkpoints.load(bad)
    r = cli(
        "train",
        "--dataset",
        "synthetic",
        "--regime",
        "flnpf",
        "--relu-checkpoint",
        bad,
        "--out",
        tmp_path / "o",
        "--epochs",
        "1",
    )
    assert r.returncode != 0 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NeuralpathError, match="diverged"):
        train(
            TrainConfig(dataset="synthetic", regime="relu", optimizer="sgd", lr=1e12, width=64, depth=6, epochs=5),
            tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o" / "result.json").exists()
