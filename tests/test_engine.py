"""The training engine: a stack of runs trains each run exactly as it would alone, for every architecture and regime
kind; it resumes bit-identically after SIGKILL; FC stacks (batched products) equal the generic loop."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from neuralpath import datasets
from neuralpath.errors import NeuralpathError
from neuralpath.regimes import build_regime
from neuralpath.stacks import FCStack, LoopStack, pack_bits, unpack_bits
from neuralpath.train import (
    FitOptions,
    RunData,
    RunSpec,
    TrainConfig,
    fit,
    run_spec,
    train,
    train_many,
    value_init_seed,
)

KW = dict(
    arch="fc",
    dataset="synthetic",
    optimizer="adam",
    lr=3e-3,
    epochs=2,
    width=16,
    depth=4,
    device="cpu",
    extra={"shape": [1, 6, 6]},
)
RUNS = [("relu", 0), ("frnpf-ii", 1), ("frnpf-di", 0), ("dlnpf", 2), ("relu", 1)]
KINDS = [("relu", 0), ("frnpf-ii", 1), ("frnpf-di", 2), ("dlnpf", 3), ("flnpf", 4)]


def _cfgs(**over):
    return [TrainConfig(regime=r, seed=s, **dict(KW, **over)) for r, s in RUNS]


def _syn64():
    x, y = datasets.synthetic("train", n=96, shape=(3, 8, 8))
    xt, yt = datasets.synthetic("test", n=40, shape=(3, 8, 8))
    return RunData(x.double(), y, xt.double(), yt, "synthetic")


def _specs(arch, bias=True):
    shape = {"fc": dict(width=16, depth=3), "resnet": dict(width=2, blocks=(1,))}.get(
        arch, dict(channels=(4, 4), hidden=(8,))
    )
    kw = dict(in_shape=(3, 8, 8), out_dim=10, bias=bias, **shape)
    if arch == "resnet":  # no bias option: its convolutions carry a bias unless batch norm follows them
        kw.pop("bias")
    relu, _ = build_regime("relu", arch, 99, None, **kw)
    out = []
    for reg, s in KINDS:
        net, _ = build_regime(reg, arch, value_init_seed(reg, s), relu.state_dict() if reg == "flnpf" else None, **kw)
        rows = torch.randperm(96, generator=torch.Generator().manual_seed(s))[:64].sort().values
        out.append(RunSpec(net=net.double(), seed=s, train_idx=rows, label=f"{reg} {s}"))
    return out


def _max_rel(a, b):
    return max(
        ((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item()
        for sa, sb in zip(a, b)
        for x, y in zip(sa.net.state_dict().values(), sb.net.state_dict().values())
        if torch.is_tensor(x)
    )


@pytest.mark.parametrize(
    "arch,bias", [(a, b) for a in ("fc", "vconv", "gconv") for b in (True, False)] + [("resnet", None)]
)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stack_equals_runs_one_by_one(arch, optimizer, bias):
    """Every regime kind (tied ReLU, frozen FRNPF-II/DI and FLNPF with cached gates, soft DLNPF) in one stack, each
    with its own seed, data order and subset, trains exactly as it does alone (float64)."""
    data = _syn64()
    opts = FitOptions(optimizer=optimizer, lr=1e-2, epochs=3, device="cpu")
    a, b = _specs(arch, bias), _specs(arch, bias)
    ra = fit(a, data, opts, progress=False)
    rb = [fit([s], data, opts, progress=False)[0] for s in b]
    assert _max_rel(a, b) <= 1e-10
    assert [r["best_test_acc"] for r in ra] == [r["best_test_acc"] for r in rb]
    assert [r["clean_test_acc"] for r in ra] == [r["clean_test_acc"] for r in rb]


def test_fc_fast_path_equals_the_loop():
    data = _syn64()
    opts = FitOptions(optimizer="adam", lr=1e-2, epochs=3, device="cpu")
    a, b = _specs("fc"), _specs("fc")
    assert FCStack.compatible([s.net for s in a])
    fit(a, data, opts, progress=False)
    fit(b, data, FitOptions(**dict(opts.__dict__, fast=False)), progress=False)
    assert _max_rel(a, b) <= 1e-10


def test_bit_packing_roundtrip():
    g = torch.rand(5, 3, 7, 9) > 0.5
    p = pack_bits(g)
    assert p.dtype == torch.uint8 and p.shape == (5, (3 * 7 * 9 + 7) // 8)
    assert torch.equal(unpack_bits(p, (3, 7, 9), torch.float32), g.float())


def test_flnpf_value_init_is_independent_of_the_relu_run():
    """FLNPF seed s must not start at the initial weights of the ReLU run s whose gates it freezes."""
    data = RunData(
        *datasets.synthetic("train", n=64, shape=(1, 6, 6)), *datasets.synthetic("test", n=32, shape=(1, 6, 6))
    )
    relu = run_spec(TrainConfig(regime="relu", **KW).resolved(), data).net
    import tempfile

    from neuralpath import checkpoints

    with tempfile.TemporaryDirectory() as d:
        checkpoints.save(
            f"{d}/r.pt",
            {"model": relu.state_dict(), "config": dict(TrainConfig(regime="relu", **KW).resolved().__dict__)},
        )
        fl = run_spec(TrainConfig(regime="flnpf", relu_checkpoint=f"{d}/r.pt", **KW).resolved(), data).net
    for lr_, lf in zip(relu.value_layers, fl.value_layers):
        assert not torch.equal(lr_.weight, lf.weight)
        # independent draws: correlation of the two initialisations is at the noise level
        c = torch.corrcoef(torch.stack([lr_.weight.flatten(), lf.weight.flatten()]))[0, 1]
        assert abs(c) < 5 / lr_.weight.numel() ** 0.5
    for a, b in zip(relu.value_layers[:-1], fl.feature_layers):  # the gates are the ReLU net's
        assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("over", [{}, {"limit_train": 500, "val_split": 0.2}, {"optimizer": "sgd", "lr": 0.05}])
def test_stacked_configs_equal_single_runs(tmp_path, over):
    cfgs = _cfgs(**over)
    ens = train_many(cfgs, [tmp_path / f"e{i}" for i in range(len(cfgs))], tmp_path / "ens.pt", progress=False)
    for i, c in enumerate(cfgs):
        one = train(c, tmp_path / f"s{i}", progress=False)
        assert ens[i]["best_epoch"] == one["best_epoch"]
        assert ens[i]["best_test_acc"] == pytest.approx(one["best_test_acc"], abs=1e-12)
        if "val_split" in over:
            assert ens[i]["best_val_acc"] == pytest.approx(one["best_val_acc"], abs=1e-12)
        a = torch.load(tmp_path / f"e{i}" / "best.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / f"s{i}" / "best.pt", weights_only=True)["model"]
        assert sorted(a) == sorted(b)
        assert a["_extra_state"] == b["_extra_state"]  # the same network configuration
        for k in b:  # float32 rounding of the batched products only
            if torch.is_tensor(b[k]):
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        ra = [json.loads(x) for x in (tmp_path / f"e{i}" / "metrics.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (tmp_path / f"s{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-4)


def test_forward_matches_each_network_float64():
    x = torch.randn(7, 36, dtype=torch.float64)
    nets = [build_regime(r, "fc", s, None, in_shape=(1, 6, 6), width=16, depth=4)[0].double() for r, s in RUNS]
    for stack in (FCStack(nets), LoopStack(nets)):
        rows = torch.arange(7).expand(len(nets), -1)
        shared = stack.forward_shared(x)
        per_run = stack.forward(x.expand(len(nets), -1, -1).contiguous())
        stack.cache_frozen_gates(x, [torch.arange(7)] * len(nets))
        cached = stack.forward(x.expand(len(nets), -1, -1).contiguous(), rows)
        for r, net in enumerate(nets):
            ref = net(x)
            for out in (shared, per_run, cached):
                torch.testing.assert_close(out[r], ref, rtol=1e-12, atol=1e-12)


def test_stack_rejects_mixed_settings(tmp_path):
    a = TrainConfig(regime="relu", **KW)
    b = TrainConfig(regime="dlnpf", **dict(KW, lr=1e-2))
    with pytest.raises(NeuralpathError, match="must share lr"):
        train_many([a, b], [tmp_path / "a", tmp_path / "b"], tmp_path / "e.pt")
    c = TrainConfig(regime="relu", **dict(KW, arch="gconv", width=None, depth=6))
    with pytest.raises(NeuralpathError, match="must share arch"):
        train_many([a, c], [tmp_path / "a", tmp_path / "c"], tmp_path / "e.pt")


def test_more_seeds_after_a_finished_stack(tmp_path):
    """`--seeds 1` then `--seeds 2` on one folder: the finished stack's state is left behind and must not
    block the new runs; an unfinished stack's state must (its runs would be lost)."""
    one = [TrainConfig(regime="relu", seed=0, **KW)]
    outs = [tmp_path / "relu-s0"]
    train_many(one, outs, tmp_path / "ens.pt", progress=False)
    more = one + [TrainConfig(regime="relu", seed=1, **KW)]
    res = train_many(more, outs + [tmp_path / "relu-s1"], tmp_path / "ens.pt", progress=False)
    alone = train(more[1], tmp_path / "alone", progress=False)
    assert res[1]["best_test_acc"] == pytest.approx(alone["best_test_acc"], abs=1e-12)
    (tmp_path / "relu-s1" / "result.json").unlink()  # as if the seed-1 stack had been killed
    with pytest.raises(NeuralpathError, match="another, unfinished set of runs"):
        train_many(
            [TrainConfig(regime="relu", seed=2, **KW)], [tmp_path / "relu-s2"], tmp_path / "ens.pt", progress=False
        )


SCRIPT = r"""
import sys
from neuralpath.train import TrainConfig, train_many
arch = sys.argv[2]
KW = dict(arch=arch, dataset="synthetic", optimizer="adam", lr=3e-3, device="cpu", extra={"shape": [3, 8, 8]})
KW.update(dict(epochs=60, width=64, depth=4) if arch == "fc" else dict(epochs=40, channels=[4, 6], hidden=[8]))
out = sys.argv[1]
cfgs = [TrainConfig(regime=r, seed=s, **KW) for r, s in [("relu", 0), ("frnpf-ii", 1), ("dlnpf", 2)]]
train_many(cfgs, [f"{out}/r{i}" for i in range(3)], f"{out}/ens.pt", progress=False, state_every_s=0)
"""


@pytest.mark.parametrize("arch", [pytest.param("fc", marks=pytest.mark.slow), "gconv"])
def test_killed_stack_resumes_to_the_same_result(tmp_path, arch):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", SCRIPT, str(ref), arch], check=True, env=env, timeout=300)
    k = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(k), arch], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two epochs are checkpointed (a conv epoch here is ~25 ms on the Zen 4:
        m = k / "r0" / "metrics.jsonl"  # 40 epochs leave ~1 s of margin; polled every 10 ms)
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (k / "r0" / "result.json").exists() and (k / "ens.pt").exists()
    subprocess.run([sys.executable, "-c", SCRIPT, str(k), arch], check=True, env=env, timeout=300)
    for i in range(3):
        a = json.loads((ref / f"r{i}" / "result.json").read_text())
        b = json.loads((k / f"r{i}" / "result.json").read_text())
        assert (a["best_test_acc"], a["best_epoch"], a["final_test_acc"]) == (
            b["best_test_acc"],
            b["best_epoch"],
            b["final_test_acc"],
        )
        ma = torch.load(ref / f"r{i}" / "best.pt", weights_only=True)["model"]
        mb = torch.load(k / f"r{i}" / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(ma[x], mb[x]) if torch.is_tensor(ma[x]) else ma[x] == mb[x] for x in ma)
        ra = [json.loads(x) for x in (ref / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (k / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [(x["epoch"], x["test_acc"], x["train_loss"]) for x in ra] == [
            (x["epoch"], x["test_acc"], x["train_loss"]) for x in rb
        ]


def test_table_cli_on_real_mnist(mnist_root, tmp_path, cli):
    out = tmp_path / "t"
    args = ["reproduce", "table", "--rows", "fc-adam", "--epochs", "1", "--seeds", "2", "--limit-train", "2000",
            "--limit-test", "1000", "--data-root", mnist_root, "--out", out]  # fmt: skip
    r = cli(*args)
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
    r2 = cli(*args)
    assert r2.returncode == 0 and r2.stdout.split("Wall time")[0] == r.stdout.split("Wall time")[0]
    assert time.time() - t < 60


def test_table_rejects_bad_rows(cli, tmp_path):
    r = cli("reproduce", "table", "--rows", "fc-rmsprop", "--out", tmp_path)
    assert r.returncode == 1 and "row" in r.stderr and "fc-adam" in r.stderr and "Traceback" not in r.stderr


def test_table_regime_subset(mnist_root, tmp_path, cli):
    """--regimes trains only the named regimes; FLNPF without its ReLU source is refused before anything runs."""
    bad = cli("reproduce", "table", "--rows", "fc-adam", "--regimes", "flnpf", "--out", tmp_path / "b")
    assert bad.returncode == 1 and "flnpf without relu" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b" / "runs").exists()
    bad = cli("reproduce", "table", "--rows", "fc-adam", "--regimes", "relu,gelu", "--out", tmp_path / "b")
    assert bad.returncode == 1 and "gelu" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "t"
    r = cli(
        "reproduce", "table", "--rows", "fc-adam", "--regimes", "relu,flnpf", "--epochs", "1", "--seeds", "1",
        "--limit-train", "500", "--limit-test", "500", "--data-root", mnist_root, "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(x["regime"] for x in recs if x["variant"] == "headline") == ["flnpf", "relu"]
    assert "| fc-adam | DLNPF | 98.22±0.05 | — |" in r.stdout


def test_stratified_subsets_match_between_trainers():
    y = datasets.synthetic("train", n=1000, shape=(1, 4, 4))[1]
    from neuralpath.train import train_val_indices

    tr, va = train_val_indices(TrainConfig(limit_train=300, val_split=0.1, seed=3), y)
    assert len(tr) + len(va) == 300 and not set(tr.tolist()) & set(va.tolist())


@pytest.mark.parametrize("arch", ["fc", "vconv", "gconv", "resnet"])
def test_load_run_round_trips_every_regime(tmp_path, arch):
    """load_run rebuilds exactly the trained network (gates, frozen features, shapes) for every regime: its
    predictions reproduce the recorded best test accuracy."""
    import neuralpath as npx

    shape = [1, 6, 6] if arch == "fc" else [3, 8, 8]
    kw = dict(arch=arch, dataset="synthetic", optimizer="adam", lr=3e-3, epochs=1, device="cpu", extra={"shape": shape})
    kw.update(
        {
            "fc": dict(width=8, depth=3),
            "vconv": dict(channels=[2], hidden=[4]),
            "gconv": dict(channels=[2, 3], hidden=[4]),
            "resnet": dict(width=2, blocks=[1]),
        }[arch]
    )
    x, y = datasets.synthetic("test", shape=tuple(shape))
    train(TrainConfig(regime="relu", **kw), tmp_path / "relu", progress=False)
    for regime in ("relu", "dlnpf", "frnpf-ii", "frnpf-di", "flnpf"):
        out = tmp_path / regime
        if regime != "relu":
            extra = {"relu_checkpoint": str(tmp_path / "relu")} if regime == "flnpf" else {}
            train(TrainConfig(regime=regime, **kw, **extra), out, progress=False)
        run = npx.load_run(out)
        with torch.no_grad():
            acc = (run.net(x).argmax(1) == y).double().mean().item()
        assert acc == pytest.approx(run.result["best_test_acc"], abs=1e-12), regime
        assert run.config["regime"] == regime
        assert getattr(run.net, "features_frozen", False) == (regime in ("flnpf", "frnpf-ii", "frnpf-di"))


@pytest.mark.slow  # compiling (inductor) takes about a minute per process on 2 cores
def test_compiled_dlnpf_trains_as_eager_and_resumes_bit_exactly(tmp_path):
    """compile=True (DLNPF conv runs): the same training as eager within float32 rounding, and a run extended from
    its saved state ends bit-identical to one trained straight through (the compiled code is deterministic)."""
    kw = dict(
        arch="gconv", regime="dlnpf", dataset="synthetic", optimizer="adam", lr=3e-3, device="cpu", limit_train=64,
        channels=[4, 6], hidden=[8], extra={"shape": [3, 8, 8]},
    )  # fmt: skip
    with pytest.raises(NeuralpathError, match="compile=True is for DLNPF runs"):
        TrainConfig(**dict(kw, regime="relu", compile=True)).resolved()
    from torch._dynamo.utils import counters

    counters.clear()
    straight = train(TrainConfig(epochs=2, compile=True, **kw), tmp_path / "c", progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward was compiled, not silently run eager
    train(TrainConfig(epochs=2, **kw), tmp_path / "e", progress=False)
    train(TrainConfig(epochs=1, compile=True, **kw), tmp_path / "x", progress=False)
    ext = train(
        TrainConfig(epochs=2, compile=True, **kw), tmp_path / "x", resume=True, allow_change=["epochs"], progress=False
    )
    a, b, c = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("c", "e", "x"))
    for k, v in a["model"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, c["model"][k]), k  # extended == straight through, bit for bit
            torch.testing.assert_close(v, b["model"][k], rtol=1e-4, atol=1e-5)  # compiled ~ eager
    assert ext["final_test_acc"] == straight["final_test_acc"]


def test_compile_is_refused_where_it_would_do_nothing(cli, tmp_path):
    """compile applies to DLNPF conv runs only: elsewhere it would be a silent no-op (or an FC stack's), so it is
    refused, in the API and in `reproduce table --compile` with an FC row."""
    for kw in (dict(arch="gconv", regime="relu"), dict(arch="fc", regime="dlnpf")):
        with pytest.raises(NeuralpathError, match="compile=True is for DLNPF runs of vconv/gconv"):
            TrainConfig(compile=True, **kw).resolved()
    r = cli("reproduce", "table", "--rows", "fc-adam", "--compile", "--out", tmp_path / "R")
    assert r.returncode == 1 and "--compile compiles the DLNPF runs of conv rows" in r.stderr
    assert not (tmp_path / "R").exists()


def test_a_run_continues_only_on_the_copy_of_the_data_it_started_on(tmp_path):
    """A run started on one copy of a data set (e.g. CIFAR-10's JPEG copy) and resumed or extended where another
    copy is found (the official files fetched into the same --data-root since) would mix the two and report the
    second's label: refused before anything is touched; the same copy continues."""
    import dataclasses
    import json

    cfg = TrainConfig(regime="relu", seed=0, **dict(KW, epochs=1))
    base = RunData.load(cfg.resolved())
    a = dataclasses.replace(base, label="copy A")
    train_many([cfg], [tmp_path / "r"], tmp_path / "st.pt", data=a, progress=False)
    assert json.loads((tmp_path / "r" / "data.json").read_text()) == {"data": "copy A", "digest": a.digest}
    TrainConfig(**json.loads((tmp_path / "r" / "config.json").read_text()))  # config.json stays a TrainConfig
    longer = dataclasses.replace(cfg, epochs=2)
    b = dataclasses.replace(base, label="copy B")
    with pytest.raises(NeuralpathError, match="was trained on copy A; the data found now is copy B"):
        train_many([longer], [tmp_path / "r"], tmp_path / "st.pt", data=b, progress=False, allow_change=("epochs",))
    assert (tmp_path / "r" / "result.json").is_file()  # the finished run's record was not removed
    res = train_many([longer], [tmp_path / "r"], tmp_path / "st.pt", data=a, progress=False, allow_change=("epochs",))
    assert res[0]["epochs"] == 2 and res[0]["data"] == "copy A"


def test_runs_record_the_digest_of_their_data_and_warn_when_a_resume_sees_other_numbers(tmp_path):
    """Two decodes of one copy can differ in a few pixels (another Pillow release): the run records the digest of
    the tensors it started on, its threads and library versions, and an extended run on other numbers says so."""
    import dataclasses
    import json

    import PIL

    cfg = TrainConfig(regime="relu", seed=0, **dict(KW, epochs=1))
    base = RunData.load(cfg.resolved())
    same = RunData(base.x_train.clone(), base.y_train.clone(), base.x_test.clone(), base.y_test.clone(), base.label)
    assert same.digest == base.digest and len(base.digest) == 32
    x = base.x_train.clone()
    x.view(-1)[7] = torch.nextafter(x.view(-1)[7], torch.tensor(math.inf, dtype=x.dtype))  # one ulp, one number
    other = dataclasses.replace(base, x_train=x)
    assert other.digest != base.digest
    assert dataclasses.replace(base, y_test=base.y_test.flip(0)).digest != base.digest
    logs = []
    res = train_many([cfg], [tmp_path / "r"], tmp_path / "st.pt", data=base, progress=False, log=logs.append)
    assert json.loads((tmp_path / "r" / "data.json").read_text())["digest"] == base.digest
    assert res[0]["data_digest"] == base.digest and res[0]["threads"] == torch.get_num_threads()
    assert res[0]["versions"]["pillow"] == PIL.__version__
    assert res[0]["versions"]["cpu"].startswith(torch.backends.cpu.get_cpu_capability())
    longer = dataclasses.replace(cfg, epochs=2)
    kw = dict(progress=False, allow_change=("epochs",), log=logs.append)
    train_many([longer], [tmp_path / "r"], tmp_path / "st.pt", data=same, **kw)
    assert not [m for m in logs if "digest" in m]  # the same numbers: nothing to say
    res = train_many([dataclasses.replace(cfg, epochs=3)], [tmp_path / "r"], tmp_path / "st.pt", data=other, **kw)
    warned = [m for m in logs if "digest" in m]
    assert len(warned) == 1 and base.digest in warned[0] and other.digest in warned[0]
    assert res[0]["epochs"] == 3 and res[0]["data_digest"] == other.digest
