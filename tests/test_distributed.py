"""torchrun with 2 CPU processes (gloo): DDP training is sound and writes once; the distributed kernel equals the
single-process kernel bit for bit."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not (REPO / ".venv/bin/torchrun").exists(), reason="torchrun not installed"
)


def torchrun(*args, timeout=300):
    exe = shutil.which("torchrun") or str(REPO / ".venv/bin/torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [exe, "--nproc_per_node", "2", "--master_port", "0", "--standalone", "-m", "neuralpath", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


SYN = ["--dataset", "synthetic", "--width", "32", "--depth", "3", "--epochs", "3", "--lr", "3e-3"]


@pytest.mark.parametrize(
    "regime", ["relu", pytest.param("frnpf-ii", marks=pytest.mark.slow), pytest.param("dlnpf", marks=pytest.mark.slow)]
)
def test_ddp_training_is_sound_and_rank0_writes(tmp_path, regime, cli):
    out = tmp_path / "ddp"
    r = torchrun("train", "--regime", regime, *SYN, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("best test accuracy") == 1  # one line: rank 0 reports
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in recs] == [1, 2, 3]  # one metrics file, one record per epoch
    res = json.loads((out / "result.json").read_text())
    assert res["best_test_acc"] > 0.5  # synthetic classes are separable: chance is 0.1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    single = cli("train", "--regime", regime, *SYN, "--out", tmp_path / "one")
    assert single.returncode == 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert abs(one["best_test_acc"] - res["best_test_acc"]) < 0.15  # same global batch: comparable training


@pytest.mark.slow
def test_ddp_resume_after_a_finished_epoch(tmp_path):
    out = tmp_path / "r"
    assert torchrun("train", *SYN[:-4], "--epochs", "2", "--lr", "3e-3", "--out", out).returncode == 0
    (out / "result.json").unlink()  # as if killed after epoch 2's checkpoint: resume runs epoch 3 only
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 2
    r = torchrun("train", *SYN[:-4], "--epochs", "2", "--lr", "3e-3", "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kind", ["npk", pytest.param("ntk", marks=pytest.mark.slow)])
def test_distributed_kernel_equals_single_process(tmp_path, kind, cli, mnist_root):
    args = [
        "kernel",
        kind,
        "--num-inputs",
        "300",
        "--block",
        "64",
        "--width",
        "32",
        "--depth",
        "4",
        "--dtype",
        "float64",
        "--data-root",
        mnist_root,
    ]
    r = torchrun(*args, "--out", tmp_path / "d.npy")
    assert r.returncode == 0, r.stderr[-2000:]
    s = cli(*args, "--out", tmp_path / "s.npy", env={"OMP_NUM_THREADS": "1"})
    assert s.returncode == 0, s.stderr
    a, b = np.load(tmp_path / "d.npy"), np.load(tmp_path / "s.npy")
    # bit for bit at the same thread count (BLAS summation order depends on it); float round-off otherwise
    assert a.shape == (300, 300) and np.array_equal(a, b)
    assert cli(*args, "--out", tmp_path / "s2.npy").returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "s2.npy"), a, rtol=1e-12, atol=0)
    assert not list(tmp_path.glob(".*partial*"))
