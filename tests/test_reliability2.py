"""Reliability, round two: no silent wrong result, no traceback, no debris (docs/RELIABILITY.md lists the classes)."""

import dataclasses
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO

import neuralpath as npx
from neuralpath import datasets
from neuralpath.errors import NeuralpathError
from neuralpath.kernels.machines import KernelRidge
from neuralpath.train import TrainConfig, train

SYN = ["--dataset", "synthetic", "--width", "16", "--depth", "3", "--lr", "3e-3"]


def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error: ")]  # progress lines may precede it
    assert len(lines) == 1 and r.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- silent wrong results ----------------------------------------------------------------------------------------
def test_two_writers_of_one_run_folder(tmp_path, cli):
    """The second writer is refused with a line naming the holder; the first finishes undisturbed."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "neuralpath", "train", *SYN, "--epochs", "400", "--out", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / ".owner").exists():
            time.sleep(0.05)
        r = cli("train", *SYN, "--epochs", "400", "--out", out, "--resume")
        _one_line_error(r, "being written by process", str(p.pid))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_two_writers_of_one_kernel_file(tmp_path):
    from filelock import FileLock

    out = tmp_path / "K.npy"
    held = FileLock(str(tmp_path / ".K.npy.lock"))
    held.acquire()
    try:
        net = npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2)
        with pytest.raises(NeuralpathError, match="being written by another"):
            npx.npk(net, torch.rand(5, 4), out=out)
    finally:
        held.release()
    assert not out.exists() and not (tmp_path / ".K.npy.partial.npy").exists()


def test_resume_with_other_settings_is_refused_naming_keys(tmp_path, cli):
    out = tmp_path / "r"
    assert cli("train", *SYN, "--epochs", "2", "--out", out).returncode == 0
    _one_line_error(cli("train", *SYN, "--epochs", "2", "--lr", "0.1", "--out", out, "--resume"), "lr=0.003", "0.1")
    _one_line_error(cli("train", *SYN, "--epochs", "2", "--regime", "dlnpf", "--out", out, "--resume"), "regime")
    _one_line_error(cli("train", *SYN, "--epochs", "4", "--out", out, "--resume"), "epochs", "--allow-change")
    before = (out / "result.json").read_text()
    r = cli("train", *SYN, "--epochs", "2", "--out", out, "--resume")  # the same config: the finished run, untouched
    assert r.returncode == 0 and (out / "result.json").read_text() == before
    r = cli("train", *SYN, "--epochs", "4", "--out", out, "--resume", "--allow-change", "epochs")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["epochs"] == 4 and res.get("extended") is True
    assert [m["epoch"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    # Session 9: config.json keeps the first request (2 epochs), so the same extension asked again was judged an
    # extension again: result.json was rewritten with the no-op's seconds (~0 s for a run of hours). Now it is done.
    extended = (out / "result.json").read_text()
    for allow in (("--allow-change", "epochs"), ()):
        r = cli("train", *SYN, "--epochs", "4", "--out", out, "--resume", *allow)
        assert r.returncode == 0 and (out / "result.json").read_text() == extended, r.stderr
    _one_line_error(cli("train", *SYN, "--epochs", "3", "--out", out, "--resume", "--allow-change", "epochs"), "never")
    _one_line_error(cli("train", *SYN, "--epochs", "2", "--out", out, "--resume"), "epochs=4 there vs 2 now")


def test_table_refuses_a_folder_of_other_runs(mnist_root, tmp_path, cli):
    args = [
        "reproduce",
        "table",
        "--rows",
        "fc-adam",
        "--seeds",
        "1",
        "--limit-train",
        "300",
        "--limit-test",
        "200",
        "--data-root",
        mnist_root,
        "--out",
        tmp_path,
    ]
    assert cli(*args, "--epochs", "1").returncode == 0
    _one_line_error(cli(*args, "--epochs", "2"), "epochs=1 there vs 2 now")
    table = (tmp_path / "table.md").read_text()
    assert "1 epochs" in table and "2 epochs" not in table


def test_scrambled_mnist_cache_is_rebuilt(mnist_root, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(mnist_root, root, ignore=shutil.ignore_patterns("cache"))
    x1, y1 = datasets.load("mnist", "test", root=root)
    xp = next((root / "cache").glob("mnist-test-*-x.npy"))
    arr = np.load(xp, mmap_mode="r+")
    arr[:] = arr[::-1].copy()  # scrambled pixels, intact header
    arr.flush()
    x2, y2 = datasets.load("mnist", "test", root=root)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_checkpoint_refuses_a_network_of_another_config(tmp_path):
    train(TrainConfig(dataset="synthetic", regime="dlnpf", width=8, depth=3, epochs=1), tmp_path / "d", progress=False)
    sd = torch.load(tmp_path / "d" / "best.pt", weights_only=True)["model"]
    with pytest.raises(NeuralpathError, match="gate='soft' in the weights vs 'hard' here"):
        npx.FCDGN(in_dim=64, width=8, depth=3).load_state_dict(sd)
    run = npx.load_run(tmp_path / "d")
    assert run.net.gate_kind == "soft" and run.config["regime"] == "dlnpf"
    x, y = datasets.synthetic("test", shape=(1, 8, 8))
    with torch.no_grad():
        acc = (run.net(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(run.result["best_test_acc"], abs=1e-12)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--dataset", "synthetic", "--limit-train", "100000"], ["--limit-train 100,000", "512"]),
        (["kernel", "npk", "--num-inputs", "1000000000"], ["--num-inputs", "60,000"]),
        (["reproduce", "nu", "--runs", "0"], ["--runs 0"]),
        (["reproduce", "ntk-split", "--epochs", "0"], ["--epochs 0"]),
        (["reproduce", "ntk-split", "--epochs", "3"], ["every 5 epochs"]),
    ],
)
def test_requests_are_never_clipped(args, needles, cli, tmp_path, mnist_root):
    extra = ["--out", tmp_path / ("k.npy" if args[0] == "kernel" else "o")]
    if args[0] != "train":
        extra += ["--data-root", mnist_root]
    _one_line_error(cli(*args, *extra), *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "k.npy").exists()


# -- tracebacks become one line -----------------------------------------------------------------------------------
def test_formerly_traceback_cases(tmp_path, cli, mnist_root):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_error(cli("data", "fetch", "mnist", "--root", f), "is a file")
    _one_line_error(cli("train", *SYN, "--epochs", "1", "--out", f), "existing file")
    _one_line_error(cli("reproduce", "table", "--rows", "fc-adam", "--out", f), "afile")
    _one_line_error(cli("train", *SYN, "--seed", "-1", "--out", tmp_path / "s"), "--seed -1")
    _one_line_error(cli("kernel", "npk", "--num-inputs", "0", "--out", tmp_path / "k.npy"), "--num-inputs 0")
    run = tmp_path / "mn"
    assert (
        cli(
            "train",
            "--width",
            "8",
            "--depth",
            "3",
            "--epochs",
            "1",
            "--limit-train",
            "200",
            "--limit-test",
            "100",
            "--data-root",
            mnist_root,
            "--out",
            run,
        ).returncode
        == 0
    )
    t = time.time()
    _one_line_error(
        cli("kernel", "npk", "--checkpoint", run, "--dataset", "cifar10", "--out", tmp_path / "k.npy"),
        "1x28x28",
        "3x32x32",
    )
    assert time.time() - t < 30  # refused before decoding anything
    r = cli("train", *SYN, "--val-split", "0.999", "--epochs", "1", "--out", tmp_path / "vs")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr


def test_kernel_ridge_misuse_is_a_clear_error():
    with pytest.raises(NeuralpathError, match="before fit"):
        KernelRidge().predict(torch.eye(3))
    with pytest.raises(NeuralpathError, match="one label per row"):
        KernelRidge().fit(torch.eye(4, dtype=torch.float64), torch.tensor([0, 1, 0]))
    m = KernelRidge(lam=1e-3).fit(torch.eye(4, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(NeuralpathError, match=r"\(m, 4\)"):
        m.predict(torch.ones(2, 3))


# -- debris and false claims -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--block", "0"], ["--out-is-folder"]])
def test_kernel_bad_output_leaves_nothing(bad, cli, tmp_path, mnist_root):
    out = tmp_path if bad == ["--out-is-folder"] else tmp_path / "k.npy"
    extra = [] if bad == ["--out-is-folder"] else bad
    r = cli("kernel", "npk", "--num-inputs", "50", "--data-root", mnist_root, *extra, "--out", out)
    _one_line_error(r)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_killed_kernel_leaves_no_partial_and_a_rerun_cleans_stale_ones(cli, tmp_path, mnist_root):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = tmp_path / "K.npy"
    args = [
        sys.executable,
        "-m",
        "neuralpath",
        "kernel",
        "ntk",
        "--num-inputs",
        "6000",
        "--block",
        "64",
        "--data-root",
        str(mnist_root),
        "--out",
        str(out),
    ]
    p = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".K.npy.partial.npy"
    deadline = time.time() + 120
    while time.time() < deadline and not partial.exists():
        time.sleep(0.05)
    time.sleep(0.2)  # the whole kernel takes seconds even on a fast CPU (3,000 inputs finished within 0.5 s on Zen 4)
    p.send_signal(signal.SIGTERM)  # SIGTERM and SIGINT unwind: the partial is removed, or kept with a journal
    assert p.wait(60) != 0
    journal = tmp_path / ".K.npy.partial.json"
    assert not out.exists()
    assert not partial.exists() or json.loads(journal.read_text())["done"] >= 1  # the same command would resume
    partial.write_bytes(b"stale")  # as a SIGKILL would leave it
    r = cli("kernel", "npk", "--num-inputs", "20", "--data-root", mnist_root, "--out", out)
    assert r.returncode == 0 and not partial.exists() and np.load(out).shape == (20, 20)
    assert not journal.exists()  # another kernel at the same name: the stale partial and journal are discarded
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["dataset"] == "mnist" and len(side["indices"]) == 20 and len(side["labels"]) == 20
    assert side["arithmetic"]["fused"] == "auto" and isinstance(side["arithmetic"]["bf16_counts"], bool)
    x, y = datasets.load("mnist", "train", root=mnist_root)
    assert [int(v) for v in y[side["indices"]]] == side["labels"]


def test_extending_a_finished_run_without_its_state_is_refused_and_keeps_its_records(tmp_path):
    """Session 15: a finished run whose state file is gone (records restored from docs/results, or checkpoints
    deleted) asked for more epochs with --allow-change epochs was retrained from epoch 1 without a word, and its
    records (result.json first) replaced. Now a one-line refusal before anything is touched."""
    cfg = TrainConfig(dataset="synthetic", regime="relu", width=16, depth=3, epochs=2)
    out = tmp_path / "run"
    train(cfg, out, progress=False, log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".pt"}
    for p in out.glob("*.pt"):
        p.unlink()
    with pytest.raises(NeuralpathError, match=r"finished run of 2 epochs whose saved state .*last\.pt\) is gone"):
        train(dataclasses.replace(cfg, epochs=4), out, resume=True, allow_change=("epochs",), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # with its state the same request continues it
    out2 = tmp_path / "run2"
    train(cfg, out2, progress=False, log=lambda *_: None)
    r = train(
        dataclasses.replace(cfg, epochs=4),
        out2,
        resume=True,
        allow_change=("epochs",),
        progress=False,
        log=lambda *_: None,
    )
    assert r["epochs"] == 4 and r.get("extended") is True


def test_nan_stop_message_says_what_is_on_disk(tmp_path):
    with pytest.raises(NeuralpathError, match="nothing was saved"):
        train(
            TrainConfig(dataset="synthetic", regime="relu", optimizer="sgd", lr=1e12, width=64, depth=6, epochs=5),
            tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o" / "result.json").exists()


def test_refused_checkpoint_message_has_no_unsafe_hint(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": Evil(), "config": {}}, tmp_path / "e.pt")
    with pytest.raises(NeuralpathError) as e:
        npx.load_net(tmp_path / "e.pt")
    assert "weights_only=False" not in str(e.value) and "refused" in str(e.value)


# -- operability -------------------------------------------------------------------------------------------------
def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        subprocess.run(
            [sys.executable, "-m", "neuralpath", "train", *SYN, "--epochs", "1", "--out", str(out)],
            check=True,
            env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
            cwd=REPO,
            capture_output=True,
        )
    finally:
        os.umask(old)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_progress_lines_when_not_a_terminal(cli, tmp_path):
    r = cli("train", *SYN, "--epochs", "3", "--out", tmp_path / "p")
    assert r.returncode == 0
    lines = [x for x in r.stderr.splitlines() if "epoch" in x]
    assert len(lines) == 3 and all("test acc" in x and " s" in x for x in lines)


def test_read_only_data_root_is_usable(mnist_root, tmp_path):
    import shutil

    root = tmp_path / "ro"
    shutil.copytree(mnist_root, root, ignore=shutil.ignore_patterns("cache"))
    for d, _, _files in os.walk(root):
        os.chmod(d, 0o555)
    if os.access(root, os.W_OK):  # root ignores permissions: nothing to test
        pytest.skip("running as a user that can write anywhere")
    x, y = datasets.load("mnist", "test", root=root, limit=100)
    assert x.shape == (100, 1, 28, 28)


def test_version_flag(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"neuralpath {npx.__version__}"


# -- round two, session 5: the commands added since, tried the same way ------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["reproduce", "budget", "--out", "FILE"], ["--out", "existing file"]),
        (["reproduce", "gates", "--pairs", "0", "--out", "G"], ["--pairs", "positive"]),
        (["reproduce", "dlgn", "--cifar", "--seeds", "0", "--out", "D"], ["--seeds", "positive"]),
        (["train", "--regime", "dlnpf", "--gating", "tanh", "--out", "T"], ["gating", "tanh", "linear"]),
        (["train", "--arch", "resnet", "--blocks", "0", "--out", "T"], ["blocks", "positive"]),
        (["train", "--arch", "fc", "--blocks", "1", "--out", "T"], ["blocks", "only", "fc"]),
        (["kernel", "npk", "--module", "os:path", "--out", "K.npy"], ["--module", "not a callable"]),
        (["kernel", "npk", "--dataset", "sd-i", "--arch", "gconv", "--num-inputs", "4", "--out", "K.npy"], ["fc"]),
        (["reproduce", "table", "--rows", "fc-adam", "--regimes", "flnpf", "--out", "R"], ["flnpf without relu"]),
    ],
    ids=["budget-out-file", "gates-pairs-0", "dlgn-cifar-seeds-0", "gating-tanh", "resnet-blocks-0", "fc-blocks",
         "module-not-callable", "conv-on-vectors", "flnpf-without-relu"],
)  # fmt: skip
def test_new_commands_refuse_bad_requests_before_work(args, needles, cli, tmp_path):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a in ("FILE", "G", "D", "T", "K.npy", "R") else a for a in args]
    r = cli(*args)
    _one_line_error(r, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written


def test_fc_kernels_on_vector_data(cli, tmp_path):
    """The oblique-tree sets are vectors: an FC network's kernels take them (formerly a tuple-unpacking traceback)."""
    r = cli("kernel", "npk", "--dataset", "sd-i", "--num-inputs", "6", "--out", tmp_path / "k.npy")
    assert r.returncode == 0, r.stderr
    k = np.load(tmp_path / "k.npy")
    assert k.shape == (6, 6) and np.allclose(k, k.T) and (np.linalg.eigvalsh(k) > -1e-6 * k.max()).all()


def test_core_import_needs_no_optional_dependency_and_reproduce_says_what_is_missing(tmp_path):
    """The library imports and computes without loading matplotlib or scikit-learn (the [plots] and [kernels]
    extras); when matplotlib is missing, `reproduce` stops in one line naming the extra, before any work."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run(
        [sys.executable, "-c", "import sys, neuralpath, torch\n"
         "k = neuralpath.npk(neuralpath.FCDGN(in_dim=4, width=3, depth=2), torch.randn(3, 4))\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')), k.shape)"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "[] torch.Size([3, 3])", r.stderr
    hide = (
        "import sys, importlib.util\n"
        "orig = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'matplotlib' else orig(n, *a)\n"
        "from neuralpath.cli import main\n"
        "sys.argv = ['neuralpath', 'reproduce', 'nu', '--out', sys.argv[1]]\n"
        "main()"
    )
    r = subprocess.run([sys.executable, "-c", hide, str(tmp_path / "o")], env=env, capture_output=True, text=True)
    _one_line_error(r, "matplotlib", "neuralpath[plots]")
    assert not (tmp_path / "o").exists()


def _table_record(**change):
    rec = json.loads((REPO / "docs/results/table-cpu/runs.jsonl").read_text().splitlines()[0])
    return json.dumps({**rec, **change})


@pytest.mark.parametrize(
    "text, needles",
    [
        (_table_record() + "\nnot json\n" + _table_record() + "\n", ["runs.jsonl:2", "not a JSON record"]),
        ("[1, 2]\n", ["runs.jsonl:1", "JSON object"]),
        (_table_record(best_test_acc=97.5) + "\n", ["best_test_acc=97.5", "fraction"]),
        (_table_record(row="fc-rmsprop") + "\n", ["record 1", "row must be one of"]),
        (json.dumps({"row": "fc-adam", "regime": "relu", "seed": 0, "best_test_acc": 0.9}) + "\n", ["no 'epochs'"]),
        (_table_record() + "\n" + _table_record() + "\n", ["record 2", "repeats the run of record 1"]),
        (
            _table_record() + "\n" + _table_record(seed=1, epochs=4, limit_train=500) + "\n",
            ["record 2", "epochs=4 here vs 12 there", "limit_train=500 here vs 10000 there"],
        ),
    ],
    ids=["garbage-line", "not-an-object", "percent", "unknown-row", "missing-field", "repeated-run", "mixed-budgets"],
)
def test_report_table_refuses_records_it_cannot_read(tmp_path, cli, text, needles):
    """`report table` on a hand-edited or foreign runs.jsonl: a garbage line in the middle was skipped silently and
    a missing field ended in a KeyError traceback; an accuracy in percent would have printed as 9,750%; two files
    appended together were averaged (a run counted twice, or two budgets under one label). Each is now a one-line
    error naming the line or record; a torn last line (an interrupted append) is still skipped."""
    p = tmp_path / "runs.jsonl"
    p.write_text(text)
    _one_line_error(cli("report", "table", p, "--out", tmp_path / "o"), *needles)
    assert not (tmp_path / "o" / "table.md").exists()


def test_report_table_skips_only_a_torn_last_line(tmp_path, cli):
    p = tmp_path / "runs.jsonl"
    p.write_text(_table_record() + "\n" + _table_record()[:40])
    r = cli("report", "table", p, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "table.md").exists()


def test_npf_refuses_non_finite_inputs():
    """npk and ntk refused NaN inputs; the explicit path features returned NaN rows without a word."""
    from neuralpath.nets import FCDGN

    x = torch.randn(5, 4)
    x[1, 2] = float("nan")
    with pytest.raises(NeuralpathError, match="NaN or inf"):
        npx.npf(FCDGN(in_dim=4, width=8, depth=3, out_dim=2), x)


def test_kernel_machines_refuse_float_labels_and_asymmetric_kernels():
    """Found by probing the API: KRR truncated a label 0.5 to class 0 and solved with a non-symmetric K_train (the
    Cholesky factorisation reads one triangle, so the other was ignored), both without a word."""
    from neuralpath.kernels.machines import fit_predict

    x = torch.randn(6, 4, dtype=torch.float64)
    K = x @ x.T
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(NeuralpathError, match="entry 0 is 0.5"):
        fit_predict("krr", K, torch.tensor([0.5, 1, 0, 1, 0, 1]), K)
    with pytest.raises(NeuralpathError, match="not symmetric"):
        fit_predict("krr", K + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1), y, K)
    pred, _ = fit_predict("krr", K, y.double(), K)  # whole-number floats are labels
    assert pred.shape == (6,)


def test_report_collect_refuses_a_destination_inside_its_source(tmp_path, cli):
    """`report collect X X` ended in shutil's SameFileError traceback; a DEST inside X would copy X into itself."""
    src = tmp_path / "exp"
    (src / "runs" / "a").mkdir(parents=True)
    (src / "runs" / "a" / "result.json").write_text("{}")
    for dest in (src, src / "sub"):
        _one_line_error(cli("report", "collect", src, dest), "inside it")
    r = cli("report", "collect", src, tmp_path / "out")
    assert r.returncode == 0 and (tmp_path / "out" / "runs" / "a" / "result.json").read_text() == "{}"
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary files left behind


def test_kernel_fit_names_its_own_flag_when_too_many_inputs(cli):
    r = cli("kernel", "fit", "--dataset", "synthetic", "--kernel", "npk", "--n-train", "100000", "--n-test", "10")
    _one_line_error(r, "--n-train 100,000")
    r = cli("kernel", "fit", "--dataset", "synthetic", "--n-train", "0", "--n-test", "10")
    _one_line_error(r, "--n-train 0 must be")  # (session 11: was named --num-inputs, a flag kernel fit lacks)


def test_relu_checkpoint_outside_flnpf_is_refused(tmp_path):
    """`train --regime relu --relu-checkpoint RUN` trained from scratch and ignored the checkpoint without a word."""
    with pytest.raises(NeuralpathError, match="read by regime 'flnpf' only"):
        TrainConfig(dataset="synthetic", regime="relu", relu_checkpoint=str(tmp_path)).resolved()


def test_load_run_refuses_a_config_json_that_disagrees_with_its_checkpoint(tmp_path):
    """load_run built the network from the checkpoint but reported config.json's settings: an edited or mixed
    folder gave a Run whose config described another network (width 32 beside a width-16 net), silently."""
    cfg = TrainConfig(dataset="synthetic", width=16, depth=3, epochs=1, lr=3e-3)
    train(cfg, tmp_path / "r", progress=False, log=lambda m: None)
    assert npx.load_run(tmp_path / "r").net.width == 16
    p = tmp_path / "r" / "config.json"
    p.write_text(p.read_text().replace('"width": 16', '"width": 32'))
    with pytest.raises(NeuralpathError, match="config.json says width=32 but best.pt was trained with width=16"):
        npx.load_run(tmp_path / "r")


def test_a_repeated_row_or_regime_is_one_request():
    """`--rows fc-adam,fc-adam` printed the row twice in the table."""
    from neuralpath.cli import _commas

    assert _commas("--rows", "fc-adam, fc-adam,gconv-adam,", "x") == ["fc-adam", "gconv-adam"]
    with pytest.raises(NeuralpathError, match="--rows is empty"):
        _commas("--rows", " , ", "fc-adam")


def test_normalised_npk_refuses_inputs_with_no_open_path():
    """normalize='cosine' returned NaN rows for an input with H(x, x) = 0 (an all-zero input of a bias-free net, or
    one for which every gate of a layer is closed: seen with 3 random inputs through a width-8 net), and 'trace' a
    NaN matrix when every input is such; both silently."""
    from neuralpath.nets import FCDGN

    g = torch.Generator().manual_seed(0)
    net = FCDGN(in_dim=4, width=16, depth=3, out_dim=2, bias=False, generator=g)
    x = torch.randn(5, 4, generator=g)
    x[2] = 0
    d = npx.npk(net, x, diag=True)
    assert d[2] == 0 and bool((d[[0, 1, 3, 4]] > 0).all())  # the premise: only row 2 has no open path
    with pytest.raises(NeuralpathError, match=r"H\(x, x\) = 0 for x1\[2\]"):
        npx.npk(net, x, normalize="cosine")
    with pytest.raises(NeuralpathError, match=r"for x2\[2\]"):
        npx.npk(net, x[:2], x, normalize="cosine")
    with pytest.raises(NeuralpathError, match="trace is 0"):
        npx.npk(net, torch.zeros(3, 4), normalize="trace")
    assert torch.isfinite(npx.npk(net, x, normalize="trace")).all()


def test_kernels_refuse_empty_or_unbatched_inputs_and_read_grad_inputs_as_values():
    """Session 9, probing the API: `ntk` of an empty batch ended in an IndexError (npk gives a (0, 0) kernel; now
    both do) and a 1-d tensor was read as one example of its first entry; an input with requires_grad=True crashed
    `npk` inside a NumPy call; a shape error named the one-row probe's shape (1, 5), not the caller's."""
    from neuralpath.nets import FCDGN

    net = FCDGN(in_dim=4, width=8, depth=3, out_dim=2)
    assert npx.ntk(net, torch.randn(0, 4)).shape == (0, 0) and npx.ntk(net, torch.randn(0, 4), diag=True).shape == (0,)
    assert npx.ntk(net, torch.randn(3, 4), torch.randn(0, 4), trace=False).shape == (3, 0, 2, 2)
    for method in ("jacobian", "vp"):
        assert npx.ntk(net, torch.randn(0, 4), method=method).shape == (0, 0)
    for f in (npx.npk, npx.ntk, npx.npf):
        with pytest.raises(NeuralpathError, match=r"shape \(4,\) is not a batch"):
            f(net, torch.randn(4))
        with pytest.raises(NeuralpathError, match=r"per-example shape \(5,\) does not match in_dim=4"):
            f(net, torch.randn(6, 5))
    x = torch.randn(5, 4)
    k = npx.npk(net, x.clone().requires_grad_())
    assert not k.requires_grad and torch.equal(k, npx.npk(net, x))


def test_module_dgn_kernels_refuse_inputs_of_another_shape_than_traced():
    """A from_module DGN's kernels follow the shapes of the traced example: other inputs ended in PyTorch's
    'mat1 and mat2 shapes cannot be multiplied' or a failed reshape; now a one-line error naming both shapes. The
    NTK of the same inputs is unchanged where the model accepts them (it is the model's own Jacobian)."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    m = m.double().eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    traced8 = npx.from_module(m, torch.randn(1, 2, 8, 8, dtype=torch.float64))
    for f in (npx.npk, npx.ntk, npx.npf):
        with pytest.raises(NeuralpathError, match=r"shape \(2, 5, 5\) but from_module traced .* \(2, 8, 8\)"):
            f(traced8, x)
    traced5 = npx.from_module(m, x[:1])
    assert npx.npk(traced5, x).shape == (3, 3)


def test_kernel_machines_and_gate_statistics_refuse_mismatched_inputs():
    """Session 9, probing the API: `alignment` truncated a label 0.5 to class 0 and `KernelRidge.predict` /
    `svm` turned a NaN row of K_test_train into an arbitrary class, silently; `flip_fraction` of two gate lists of
    different layouts compared what zip() left; mismatched lengths ended in PyTorch's shape errors and a one-class
    SVM in scikit-learn's. Each is now a one-line error naming what to pass."""
    from neuralpath import gatestats
    from neuralpath.kernels.infinite import npk_infinite
    from neuralpath.kernels.machines import accuracy, alignment, fit_predict
    from neuralpath.nets import FCDGN

    x = torch.randn(6, 4, dtype=torch.float64)
    K, y = x @ x.T, torch.tensor([0, 1, 2, 0, 1, 2])
    nan_row = K.clone()
    nan_row[2, 1] = float("nan")
    cases = [
        (lambda: alignment(K, y.double() + 0.5), "entry 0 is 0.5"),
        (lambda: alignment(K, y[:4]), r"y has shape \(4,\) but K is \(6, 6\)"),
        (lambda: fit_predict("krr", K, y, nan_row), "K_test_train has NaN"),
        (lambda: fit_predict("svm", K, y, nan_row), "K_test_train has NaN"),
        (lambda: fit_predict("svm", K, torch.zeros(6, dtype=torch.long), K), "one class only"),
        (lambda: accuracy(y[:4], y), r"predictions of shape \(4,\) against labels of shape \(6,\)"),
        (lambda: accuracy(y[:0], y[:0]), "at least one"),
        (lambda: npk_infinite(x, torch.randn(3, 5, dtype=torch.float64), depth=3), "same number of features"),
    ]
    net = FCDGN(in_dim=4, width=8, depth=3, out_dim=3).double()
    g6, g3 = gatestats.hard_gates(net, x), gatestats.hard_gates(net, x[:3])
    cases += [
        (lambda: gatestats.flip_fraction(g6, g3), "the two gate lists differ"),
        (lambda: gatestats.flip_fraction(g6, g6[:1]), "the two gate lists differ"),
        (lambda: gatestats.class_overlap(g6, y[:3]), r"y has shape \(3,\)"),
        (lambda: gatestats.regions_along_segment(net, x[0], torch.randn(5)), "got 4 and 5"),
    ]
    for f, needle in cases:
        with pytest.raises(NeuralpathError, match=needle):
            f()
    # what they still compute: the same numbers as before on well-formed inputs
    assert alignment(K, y) == pytest.approx(float((K * (y[:, None] == y[None]).double()).sum()
                                               / (K.norm() * (y[:, None] == y[None]).double().norm())))  # fmt: skip
    assert gatestats.flip_fraction(g6, g6) == [0.0, 0.0] and accuracy(y, y) == 1.0


def test_device_names_one_gpu_of_several(monkeypatch):
    """`--device cuda:N` was refused as unknown (a machine with several GPUs could not pick one); now accepted and
    checked against the devices there are, in one line."""
    from neuralpath.train import resolve_device

    assert TrainConfig(dataset="synthetic", device="cuda:1").resolved().device == "cuda:1"
    with pytest.raises(NeuralpathError, match="'cuda:x' is not known"):
        TrainConfig(dataset="synthetic", device="cuda:x").resolved()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NeuralpathError, match="'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(NeuralpathError, match=r"has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_kernel_commands_refuse_fresh_network_flags_beside_a_checkpoint(tmp_path, cli):
    """`kernel fit|npk --checkpoint RUN --arch gconv` (or --regime, --width, --depth, --seed) computed the
    checkpoint's own network and ignored the flags without a word; `kernel fit --n-train 1` failed inside the
    solver, and `--out FOLDER` with the OS's 'Is a directory'. Each is refused before any data is decoded."""
    run = tmp_path / "r"
    r = cli("train", "--dataset", "synthetic", "--width", "8", "--depth", "3", "--epochs", "1", "--out", run)
    assert r.returncode == 0, r.stderr
    fit = ("kernel", "fit", "--dataset", "synthetic", "--n-test", "20")
    _one_line_error(cli(*fit, "--n-train", "50", "--checkpoint", run, "--arch", "gconv"), "--arch describes a fresh")
    _one_line_error(
        cli(*fit, "--n-train", "50", "--checkpoint", run, "--regime", "dlnpf", "--seed", "3"), "drop --regime, --seed"
    )
    _one_line_error(cli("kernel", "npk", "--checkpoint", run, "--width", "64", "--out", tmp_path / "k.npy"), "--width")
    assert not (tmp_path / "k.npy").exists()
    _one_line_error(cli(*fit, "--n-train", "1", "--checkpoint", run), "at least 2 training points")
    _one_line_error(cli(*fit, "--n-train", "50", "--checkpoint", run, "--out", tmp_path), "is a folder")
    r = cli(*fit, "--n-train", "50", "--checkpoint", run)  # the checkpoint alone, and a fresh net with its flags
    assert r.returncode == 0 and "NPK + KRR" in r.stdout, r.stderr
    r = cli(*fit, "--n-train", "50", "--arch", "fc", "--seed", "2")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["reproduce", "table", "--rows", "fc-adam", "--epochs", "0", "--out", "R"], ["--epochs", "positive"]),
        (["reproduce", "table", "--rows", "fc-adam", "--limit-train", "0", "--out", "R"], ["--limit-train"]),
        (["reproduce", "table", "--rows", "gconv-adam", "--width", "0", "--out", "R"], ["--width", "(0, 1]"]),
        (["reproduce", "kernels", "--n-train", "0", "--out", "R"], ["--n-train", "positive"]),
        (["reproduce", "kernels", "--relu-run", "RUN", "--arch", "gconv", "--out", "R"], ["drop --arch"]),
        (["reproduce", "kernels", "--relu-run", "RUN", "--n-train", "99", "--n-test", "0", "--out", "R"], ["--n-test"]),
        (["reproduce", "kernels", "--relu-run", "RUN", "--n-train", "100000", "--out", "R"], ["--n-train", "exceeds"]),
    ],
    ids=["table-epochs-0", "table-limit-train-0", "table-width-0", "kernels-n-train-0", "relu-run-arch",
         "relu-run-n-test-0", "relu-run-too-many"],
)  # fmt: skip
def test_zero_is_a_request_not_the_default(args, needles, cli, tmp_path):
    """Session 9: `reproduce table --epochs 0` (or --limit-train 0, --width 0) and `reproduce kernels --n-train 0`
    silently trained at the budget's own value (`x or default`); with --relu-run, --n-test 0 became 1,000 and --arch,
    --budget, --epochs were ignored. Each is refused before any work, and nothing is written."""
    run = tmp_path / "RUN"
    if "RUN" in args:
        r = cli("train", "--dataset", "synthetic", "--width", "8", "--depth", "3", "--epochs", "1", "--out", run)
        assert r.returncode == 0, r.stderr
    args = [str(tmp_path / a) if a in ("R", "RUN") else a for a in args]
    _one_line_error(cli(*args), *needles)
    assert not (tmp_path / "R").exists()


def test_dataset_seed_must_be_a_non_negative_integer():
    """`datasets.load(..., seed=-1)` ended in NumPy's 'expected non-negative integer' (the CLI checks --seed; the
    API did not); numpy integers are seeds too."""
    with pytest.raises(NeuralpathError, match="seed=-1 must be an integer >= 0"):
        datasets.load("synthetic", "train", limit=5, seed=-1)
    a = datasets.load("synthetic", "train", limit=5, seed=np.int64(3))
    b = datasets.load("synthetic", "train", limit=5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(arch="gconv", width=32), "width=32 is read by arch 'fc' and 'resnet' only"),
        (dict(arch="vconv", depth=4), "depth=4 is read by arch 'fc' only"),
        (dict(arch="resnet", depth=3), "depth=3 is read by arch 'fc' only"),
        (dict(arch="fc", channels=[8]), "channels=/hidden= are read by arch 'vconv' and 'gconv' only"),
        (dict(arch="resnet", regime="dlnpf", gating="linear"), "arch 'resnet' is trained with the paper's gating"),
        (dict(arch="resnet", bias=False), "bias=False"),
    ],
    ids=["gconv-width", "vconv-depth", "resnet-depth", "fc-channels", "resnet-gating", "resnet-bias"],
)
def test_settings_the_architecture_would_not_read_are_refused(kw, needle):
    """Session 10: `train --arch gconv --width 32` (or --depth 4) trained the paper's GCONV, and a ResNet dropped
    gating/value_input/bias, without a word. 128 (what every resolved config records as width) still passes."""
    with pytest.raises(NeuralpathError, match=re.escape(needle)):
        TrainConfig(dataset="synthetic", **kw).resolved()
    assert TrainConfig(arch="gconv", width=128).resolved().width == 128


def test_reproduce_table_width_is_refused_for_fc_rows(cli, tmp_path):
    """Session 10: `reproduce table --rows fc-adam --width 0.5` trained the paper's 6x128 without a word."""
    _one_line_error(
        cli("reproduce", "table", "--rows", "fc-adam", "--width", "0.5", "--out", tmp_path / "R"), "fully connected"
    )
    assert not (tmp_path / "R").exists()


def test_a_frozen_soft_gate_network_is_not_cached_as_bits():
    """Session 10: a soft-gate network with its feature network frozen (a DLNPF net frozen after training) had its
    gates cached as bits g > 0 by the engine's stack, i.e. every gate 1: the stack trained another network. Soft
    gates are now recomputed per batch; the stack's output equals the network's own (float64)."""
    from neuralpath.nets import FCDGN, ConvDGN
    from neuralpath.stacks import make_stack

    torch.manual_seed(0)
    nets = [
        FCDGN(in_dim=20, width=16, depth=3, gate="soft").double().freeze_features(),
        ConvDGN("gconv", channels=(4,), hidden=(8,), image_size=8, gate="soft").double().freeze_features(),
    ]
    for net in nets:
        x = torch.randn(10, *net.input_shape, dtype=torch.float64)
        st = make_stack([net, net])
        st.cache_frozen_gates(x, [torch.arange(10)] * 2)
        assert st.cached_gates_nbytes() == 0
        out = st.forward(torch.stack([x, x]), torch.arange(10).repeat(2, 1))
        with torch.no_grad():
            torch.testing.assert_close(out.detach()[1], net(x), rtol=0, atol=1e-12)


def test_report_collect_leaves_unfinished_runs_out(tmp_path, cli):
    """Session 10: `report collect` copied the metrics of runs still training (no result.json) beside finished
    ones, so docs/results could hold a half-trained run read as a record; it now leaves them out and says so."""
    src = tmp_path / "exp"
    for run, done in (("a", True), ("b", False)):
        (src / "runs" / run).mkdir(parents=True)
        (src / "runs" / run / "config.json").write_text("{}")
        (src / "runs" / run / "metrics.jsonl").write_text('{"epoch": 1}\n')
        if done:
            (src / "runs" / run / "result.json").write_text("{}")
    r = cli("report", "collect", src, tmp_path / "out")
    assert r.returncode == 0 and "1 unfinished run(s) left out" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "out" / "runs" / "a" / "metrics.jsonl").is_file()
    assert not (tmp_path / "out" / "runs" / "b").exists()


def test_reproduce_flags_the_chosen_experiment_would_not_read(cli, tmp_path):
    """Session 10: `reproduce dlgn --cifar --sets sd-i` (or --budget quick) started the CIFAR run and ignored the
    flag; `reproduce budget --limit-test 0` was refused only after its first point had begun."""
    _one_line_error(cli("reproduce", "dlgn", "--cifar", "--sets", "sd-i", "--out", tmp_path / "R"), "--sets is for")
    _one_line_error(cli("reproduce", "budget", "--limit-test", "0", "--out", tmp_path / "R"), "--limit-test=0")
    assert not (tmp_path / "R").exists()


def test_kernel_ridge_reselects_its_ridge_on_every_fit_and_checks_its_settings():
    """Session 10: a KernelRidge() fitted twice kept the ridge it had selected on the first data (fit overwrote
    lam), so a refit on another kernel used the wrong one; lam=-1 or nan were blamed on the kernel, lams=() and
    select_n=0 ended in Python/PyTorch errors."""
    torch.manual_seed(0)
    X = torch.randn(200, 5, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    K1, K2 = X @ X.T, (X @ X.T + 1) ** 3
    fresh = KernelRidge().fit(K2, y).lam
    kr = KernelRidge().fit(K1, y)
    assert kr.lam != fresh  # the two kernels select different ridges: the check below can fail
    assert kr.fit(K2, y).lam == fresh
    for kw, needle in (
        (dict(lam=-1.0), "lam=-1.0 must be a finite number >= 0"),
        (dict(lam=float("nan")), "lam=nan"),
        (dict(lams=()), "lams=() must be one or more"),
        (dict(select_n=0), "select_n=0 must be an integer >= 2"),
    ):
        with pytest.raises(NeuralpathError, match=re.escape(needle)):
            KernelRidge(**kw)


def test_kernel_dtype_names_and_half_precision():
    """Session 10: `npk(net, x, dtype="float64")` ended in PyTorch's 'Invalid device string' (the name reached
    `.to()`); float16/bfloat16 kernels were attempted. Names are accepted; other dtypes are one-line errors."""
    net = npx.FCDGN(in_dim=5, width=8, depth=3, out_dim=2)
    x = torch.randn(4, 5)
    for f in (npx.npk, npx.ntk, npx.npf):
        assert f(net, x, dtype="float64").dtype == torch.float64
        with pytest.raises(NeuralpathError, match="kernels compute in float32 or float64"):
            f(net, x, dtype=torch.float16)
    torch.testing.assert_close(npx.npk(net, x, dtype="float64"), npx.npk(net.double(), x.double()))


@pytest.mark.parametrize(
    "var, value",
    [("NEURALPATH_FUSED", "yes"), ("NEURALPATH_HEAP", "2"), ("NEURALPATH_THREADS", "1"), ("NEURALPATH_BF16", "yes")],
)
def test_kernel_environment_switches_refuse_unknown_values(monkeypatch, var, value):
    """The kernels' environment switches take 0/1 (and auto; NEURALPATH_THREADS auto/fixed); anything else is a
    one-line error naming the variable, not a silent default."""
    monkeypatch.setenv(var, value)
    net = npx.ConvDGN("gconv", in_channels=2, out_dim=3, channels=(3,), hidden=(4,), image_size=6, tied=True)
    with pytest.raises(NeuralpathError, match=f"{var}='{value}': use one of"):
        npx.npk(net, torch.rand(20, 2, 6, 6), block=16)
