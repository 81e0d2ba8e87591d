"""The ``neuralpath`` command line: data, train, kernel, reproduce. Errors print one line and exit non-zero."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import NeuralpathError

USER_ERRORS = (
    NeuralpathError,
    ValueError,
    TypeError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
# internal argument names -> the flags a user types, so that a message names what was typed
FLAGS = {
    "limit_train": "--limit-train",
    "limit_test": "--limit-test",
    "val_split": "--val-split",
    "batch_size": "--batch-size",
    "save_every": "--save-every",
    "seed": "--seed",
    "epochs": "--epochs",
    "lr": "--lr",
    "width": "--width",
    "depth": "--depth",
    "regime": "--regime",
    "arch": "--arch",
    "optimizer": "--optimizer",
    "dataset": "--dataset",
    "device": "--device",
    "budget": "--budget",
    "row": "--rows",
    "seeds": "--seeds",
    "params": "--params",
    "dtype": "--dtype",
    "block": "--block",
}


def _flagify(msg: str) -> str:
    """'seed=-1 must be ...' -> '--seed -1 must be ...' (only at the start of the message, for known names)."""
    import re

    m = re.match(r"([a-z_]+)=(\S+)(.*)", msg, re.S)
    if m and m.group(1) in FLAGS:
        return f"{FLAGS[m.group(1)]} {m.group(2)}{m.group(3)}"
    return msg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="neuralpath", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx, debug):
    """neuralpath: neural path features, values and kernels of deep gated (ReLU) networks."""
    ctx.obj = {"debug": debug}


# -- data -----------------------------------------------------------------------------------------------
@cli.group()
def data():
    """Fetch and inspect data sets (mnist, fashion-mnist, cifar10)."""


@data.command("fetch")
@click.argument("name")
@click.option("--root", default=None, help="Data folder (default: $NEURALPATH_DATA or ~/.cache/neuralpath).")
@click.option("--mirror", "mirrors", multiple=True, help="Base URL to download from instead of the official ones.")
def data_fetch(name, root, mirrors):
    """Download (or find locally) a data set and verify its checksums."""
    from . import datasets
    from .errors import check_choice

    check_choice("data set NAME", name, datasets.NAMES)  # the argument, not --dataset (which this command lacks)

    rep = datasets.fetch(
        name, root, mirrors=list(mirrors) or None, progress=sys.stderr.isatty(), log=lambda m: click.echo(m, err=True)
    )
    for k, v in rep.items():
        click.echo(f"{k}: {v}")
    click.echo(f"{name}: ready in {root or datasets.default_root()}")


@data.command("info")
@click.argument("name", required=False)
@click.option("--root", default=None, help="Data folder.")
def data_info(name, root):
    """Where each data set is and which copy is in use."""
    from . import datasets

    for rec in datasets.info(name, root):
        click.echo(json.dumps(rec))


def _shown(flag, default, help):
    """An option whose default --help shows."""
    return click.option(flag, default=default, show_default=True, help=help)


# -- train ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--arch", default="fc", show_default=True, help="fc | vconv | gconv | resnet")
@click.option("--dataset", default="mnist", show_default=True, help="mnist | fashion-mnist | cifar10 | synthetic")
@click.option("--regime", default="relu", show_default=True, help="relu | dlnpf | flnpf | frnpf-ii | frnpf-di")
@click.option("--optimizer", default="adam", show_default=True, help="adam | sgd")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the paper's for arch/optimizer).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the paper's for arch/optimizer).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--width", type=int, default=None, help="fc: width (128); resnet: first-stage channels (16).")
@click.option("--depth", type=int, default=6, show_default=True, help="fc depth d (d-1 gated hidden layers).")
@click.option("--blocks", default=None, help="resnet: basic blocks per stage, comma-separated (default 1,1,1).")
@click.option("--relu-checkpoint", default=None, help="FLNPF: a ReLU run folder (its best.pt) or a checkpoint file.")
@click.option("--limit-train", type=int, default=None, help="Train on a stratified subset of this size.")
@click.option("--limit-test", type=int, default=None, help="Evaluate on a stratified subset of this size.")
@click.option("--val-split", type=float, default=0.0, show_default=True, help="Fraction held out for validation.")
@click.option("--data-root", default=None)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--save-every", type=int, default=0, show_default=True, help="Keep epoch_K.pt every K epochs.")
@click.option("--out", required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@_shown("--gating", "relu", "The feature network: relu (the paper) | linear (DLGN) | shallow (DLGN-SF).")
@click.option("--value-input", default="x", show_default=True, help="x | ones (the DLGN's piecewise-constant 'pwc').")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for training (off: the paper's float32 arithmetic).")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="DLNPF vconv/gconv: torch.compile the training forward (GCONV steps ~6-9% faster here, VCONV no "
    "faster; compiling takes ~1 min).",
)
@click.option(
    "--allow-change",
    "allow_change",
    multiple=True,
    help="With --resume: a setting that may differ from the run's (only 'epochs': train it longer).",
)
@click.option(
    "--per-rank-batch",
    is_flag=True,
    help="Under torchrun: --batch-size is per process (default: the global batch, split among processes).",
)
def train(out, resume, allow_change, blocks, compile_, **kw):
    """Train one network in one regime; writes metrics.jsonl, checkpoints and result.json to --out."""
    from .train import TrainConfig
    from .train import train as run

    if blocks is not None:
        try:
            kw["blocks"] = [int(b) for b in blocks.split(",")]
        except ValueError:
            raise click.BadParameter(f"--blocks {blocks!r}: give integers separated by commas, e.g. 2,2,2") from None
    cfg = TrainConfig(compile=compile_, **kw)
    res = run(cfg, out, resume=resume, allow_change=allow_change, log=lambda m: click.echo(m, err=True))
    from . import distributed

    if distributed.is_main():
        click.echo(
            f"best test accuracy {res['best_test_acc']:.4f} (epoch {res['best_epoch']}), final "
            f"{res['final_test_acc']:.4f}; records in {out}"
        )


# -- kernel ---------------------------------------------------------------------------------------------
def _kernel_options(f):
    opts = [
        click.option("--checkpoint", default=None, help="A run folder (its best.pt) or a checkpoint file."),
        click.option(
            "--module",
            "module",
            default=None,
            help="Your own ReLU model: pkg.module:factory (a callable returning the nn.Module).",
        ),
        click.option("--weights", default=None, help="With --module: a state_dict file for the model (weights only)."),
        click.option("--arch", default=None, help="A fresh network: fc | vconv | gconv (default fc)."),
        click.option("--regime", default=None, help="A fresh network's regime (default relu)."),
        click.option("--width", type=int, default=None, help="A fresh FC network's width (default 128)."),
        click.option("--depth", type=int, default=None, help="A fresh FC network's depth (default 6)."),
        click.option("--seed", type=int, default=None, help="A fresh network's seed (default 0)."),
        click.option("--dataset", default=None, help="Data set (default: the checkpoint's, else mnist)."),
        click.option("--split", default="train", show_default=True),
        click.option(
            "--num-inputs",
            "--n",
            "n",
            type=int,
            default=1000,
            show_default=True,
            help="Stratified subset size (spell it --num-inputs under torchrun, which claims --n).",
        ),
        click.option("--data-root", default=None),
        click.option("--block", type=int, default=1024, show_default=True, help="Tile size of the Gram engine."),
        click.option("--dtype", default="float32", show_default=True, help="float32 | float64"),
        click.option("--device", default="auto", show_default=True),
        click.option("--out", required=True, help="Output .npy file (streamed as a memmap, renamed when done)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _user_model(spec, weights):
    """The nn.Module named by --module pkg.module:factory, with --weights loaded (weights_only)."""
    import importlib
    import os

    import torch

    from .errors import NeuralpathError

    if ":" not in spec:
        raise NeuralpathError(f"--module {spec!r}: give pkg.module:factory (a callable that returns the model)")
    mod, fn = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise NeuralpathError(f"--module {spec!r}: cannot import it ({e})") from None
    if not callable(factory) or isinstance(factory, type(importlib)):
        raise NeuralpathError(f"--module {spec!r}: {fn!r} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failing is reported in one line
        raise NeuralpathError(f"--module {spec!r}: calling {fn}() failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise NeuralpathError(f"--module {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    if weights:
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is refused the same way
            raise NeuralpathError(f"--weights {weights}: refused to load ({str(e).splitlines()[0][:120]})") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        elif isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise NeuralpathError(f"--weights {weights} do not fit the model: {str(e).splitlines()[0][:160]}") from None
    return model.eval()


def _kernel_setup(
    checkpoint,
    arch,
    regime,
    width,
    depth,
    seed,
    dataset,
    split,
    n,
    data_root,
    dtype,
    device,
    module=None,
    weights=None,
    n_flag="--num-inputs",
):
    """(network, inputs, sidecar record) of a kernel request; every check happens before any data is decoded."""
    import torch

    from . import checkpoints, datasets
    from .errors import NeuralpathError, check_choice
    from .regimes import build_regime
    from .train import TrainConfig, net_kwargs, resolve_device

    check_choice("--dtype", dtype, ("float32", "float64"))
    check_choice("--split", split, datasets.SPLITS)
    fresh = {"--arch": arch, "--regime": regime, "--width": width, "--depth": depth, "--seed": seed}
    given = [k for k, v in fresh.items() if v is not None]
    if (checkpoint or module) and given:  # they would be ignored: the network comes from the checkpoint/model
        src = f"--checkpoint {checkpoint}" if checkpoint else f"--module {module}"
        raise NeuralpathError(
            f"{', '.join(given)} {'describes' if len(given) == 1 else 'describe'} a fresh network, but {src} "
            f"brings its own; drop {', '.join(given)}"
        )
    arch, regime = arch or "fc", regime or "relu"
    width, depth, seed = 128 if width is None else width, 6 if depth is None else depth, seed or 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise NeuralpathError(f"{n_flag} {n!r} must be a positive integer")
    if module:
        from .anynet import from_module

        if checkpoint:
            raise NeuralpathError("give --module (your model) or --checkpoint (a neuralpath run), not both")
        model = _user_model(module, weights)
        dataset = dataset or "mnist"
        check_choice("--dataset", dataset, datasets.NAMES)
        datasets.check_limit(n_flag, n, dataset, split, root=data_root)
        x, y, idx = datasets.load(dataset, split, root=data_root, limit=n, seed=0, with_indices=True)
        dev = resolve_device(device)
        model = model.to(dev, getattr(torch, dtype))
        net = from_module(model, x[:2].to(dev, getattr(torch, dtype)))
        return net, x, _side(dataset, data_root, split, idx, y, net, module=module, weights=weights, dtype=dtype)
    if checkpoint:
        ck = checkpoints.load(checkpoint)
        cfg = TrainConfig(**{k: v for k, v in ck["config"].items() if k in TrainConfig.__dataclass_fields__})
        trained_on = cfg.dataset
        dataset = dataset or cfg.dataset
        a, b = datasets.SHAPES.get(trained_on), datasets.SHAPES.get(dataset)
        if a and b and a != b:
            raise NeuralpathError(
                f"{checkpoint} was trained on {trained_on} ({a[0]}x{a[1]}x{a[2]} images); --dataset "
                f"{dataset} has {b[0]}x{b[1]}x{b[2]} images: use a data set of the same shape"
            )
    else:
        cfg = TrainConfig(arch=arch, regime=regime, width=width, depth=depth, seed=seed, dataset=dataset or "mnist")
        cfg.resolved() if regime != "flnpf" else None
        if regime == "flnpf":
            raise NeuralpathError("--regime flnpf needs trained gates: pass --checkpoint of an FLNPF run instead")
        dataset = cfg.dataset
    check_choice("--dataset", dataset, datasets.NAMES)
    dev = resolve_device(device)
    datasets.check_limit(n_flag, n, dataset, split, root=data_root)
    x, y, idx = datasets.load(dataset, split, root=data_root, limit=n, seed=0, with_indices=True)
    # an FLNPF checkpoint already holds its frozen feature network: build the same shape (hard, untied), then load
    build = "frnpf-ii" if (checkpoint and cfg.regime == "flnpf") else cfg.regime
    net, _ = build_regime(build, cfg.arch, cfg.seed, None, **net_kwargs(cfg, x.shape[1:], 10))
    if checkpoint:
        net.load_state_dict(ck["model"])
    from . import distributed

    _, world, local = distributed.init(dev.type)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local)
    net = net.to(dev, getattr(torch, dtype))
    ck_path = None if not checkpoint else str(checkpoint)
    side = _side(dataset, data_root, split, idx, y, net, checkpoint=ck_path, regime=cfg.regime, seed=cfg.seed)
    return net, x, dict(side, dtype=dtype)


def _side(dataset, data_root, split, idx, y, net, **extra):
    """A kernel file's sidecar: which examples its rows are, their labels, the network, and ``extra``."""
    from . import datasets

    return {
        "dataset": dataset,
        "data": datasets.source_label(dataset, data_root),
        "split": split,
        "indices": [int(i) for i in idx],
        "labels": [int(v) for v in y],
        "network": net.config(),
        **extra,
        "rows": "row i of the kernel is example indices[i] of the split (columns likewise)",
    }


def _kernel_progress():
    """A bar on a terminal; on a log file (nohup, a batch job) a line every ten minutes (kernels/gram.py)."""
    return True if sys.stderr.isatty() else "log"


def _write_sidecar(out, side):
    from pathlib import Path

    from .io import write_json

    write_json(Path(out).with_suffix(".json"), side)


@cli.group()
def kernel():
    """Kernels of a trained or fresh network on a data set: npk, ntk."""


@kernel.command("npk")
@_kernel_options
@click.option("--normalize", default=None, help="none | trace | cosine")
def kernel_npk(block, out, normalize, **kw):
    """Neural path kernel of a network's gates, written to --out (.npy). Under torchrun the tiles are split among
    the processes, which write into the one output file."""
    from . import distributed
    from .errors import check_choice
    from .kernels.npk import npk

    check_choice("--normalize", normalize, (None, "none", "trace", "cosine"))
    net, x, side = _kernel_setup(**kw)
    if normalize in (None, "none"):
        path = npk(net, x, block=block, out=out, progress=_kernel_progress())
    else:
        from .io import save_npy

        path = out
        K = npk(net, x, normalize=normalize, block=block).cpu().numpy()
        if distributed.is_main():
            save_npy(out, K)
    if distributed.is_main():
        import torch

        from .kernels import fused

        # what moves float32 values at rounding between machines and settings (kernels/fused.py)
        arith = dict(torch=torch.__version__, fused=fused.fused_mode(), bf16_counts=fused.counts_in_bf16(256))
        _write_sidecar(out, dict(side, kernel="npk", normalize=normalize, arithmetic=arith))
        click.echo(f"NPK ({len(x)} x {len(x)}) written to {path}; rows described in {Path(out).with_suffix('.json')}")


@kernel.command("ntk")
@_kernel_options
@click.option("--params", default="value", show_default=True, help="value | feature | all")
def kernel_ntk(block, out, params, **kw):
    """Empirical NTK (summed over outputs), written to --out (.npy): structured for the project's networks, by
    per-example Jacobians in tiles for a --module network."""
    from .errors import check_choice
    from .kernels.ntk import PARAMS, ntk
    from .nets.base import DGN

    check_choice("--params", params, PARAMS)
    net, x, side = _kernel_setup(**kw)
    path = ntk(net, x, params=params, block=block, out=out, progress=_kernel_progress())
    from . import distributed

    if distributed.is_main():
        method = "structured" if isinstance(net, DGN) else "jacobian"
        _write_sidecar(out, dict(side, kernel="ntk", params=params, method=method))
        click.echo(
            f"NTK ({len(x)} x {len(x)}, params={params}) written to {path}; rows described in "
            f"{Path(out).with_suffix('.json')}"
        )


# -- reproduce ------------------------------------------------------------------------------------------
def _where(out, device="auto", device_help="auto | cpu | cuda | cuda:N"):
    """The options every experiment shares, in this order: --data-root, --device, --out."""

    def deco(f):
        f = click.option("--out", default=out, show_default=True)(f)
        f = click.option("--device", default=device, show_default=True, help=device_help)(f)
        return click.option("--data-root", default=None)(f)

    return deco


def _env(data_root=None, device="auto"):
    """The experiments' environment under the CLI: a progress bar on a terminal, the log on stderr."""
    from .experiments.common import Env

    return Env(data_root=data_root, device=device, progress=_progress(), log=lambda m: click.echo(m, err=True))


def _echo_run(run, out, *args, data_root=None, device="auto", **kw):
    """Run an experiment's ``run(out, ...)`` in the CLI's environment and print the report it returns."""
    _check_out_folder(out)
    click.echo(run(out, *args, env=_env(data_root, device), **kw))


def _check_out_folder(out):
    """An experiment's --out must be a folder (or not exist yet): refused before any work otherwise."""
    from pathlib import Path

    from .errors import NeuralpathError

    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise NeuralpathError(f"--out {out} is an existing file, not a folder; pick another --out")


def _progress():
    return True if sys.stderr.isatty() else None


def _commas(flag, value, example):
    """A comma-separated option as a list (a list passes through); an empty one is refused."""
    from .errors import NeuralpathError

    if not isinstance(value, str):
        return value
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))  # a repeat is one request
    if not items:
        raise NeuralpathError(f"{flag} is empty; give e.g. {flag} {example}")
    return items


def _table(
    rows, seeds, budget, out, overrides=None, stacked=True, regimes=None, data_root=None, device="auto", compile_=False
):
    from .experiments import table

    rows = _commas("--rows", rows, "fc-adam,fc-sgd")
    regimes = None if regimes is None else _commas("--regimes", regimes, "relu,flnpf")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    kw = dict(rows=rows, seeds=seeds, budget=budget, overrides=overrides, stacked=stacked, regimes=regimes)
    kw.update(compile_dlnpf=compile_)
    _echo_run(table.run, out, data_root=data_root, device=device, **kw)


@cli.group(invoke_without_command=True)
@click.option("--out", default="runs/reproduce", show_default=True, help="Folder of the default (quick FC) table.")
@click.option("--data-root", default=None)
@click.pass_context
def reproduce(ctx, out, data_root):
    import importlib.util

    from .errors import NeuralpathError

    if importlib.util.find_spec("matplotlib") is None:  # before any work: every experiment ends in plots
        raise NeuralpathError("reproduce writes plots and needs matplotlib: pip install 'neuralpath[plots]'")
    """Experiments of the paper, with its numbers beside ours.

    With no sub-command: the quick budget of the FC rows of the table (5 regimes x 2 seeds, real MNIST)."""
    if ctx.invoked_subcommand is None:
        _table("fc-sgd,fc-adam", 2, "quick", out, data_root=data_root)


@reproduce.command("table")
@_shown(
    "--rows",
    ",".join(["fc-sgd", "fc-adam", "vconv-sgd", "vconv-adam", "gconv-sgd", "gconv-adam"]),
    "Comma-separated rows.",
)
@click.option("--seeds", type=int, default=5, show_default=True, help="Seeds 0..N-1 per regime.")
@_shown("--budget", "quick", "quick (minutes) | cpu (a conv row: 3-6 h on 2 cores; FC rows: the paper's) | paper")
@click.option("--epochs", type=int, default=None, help="Override the budget's epochs.")
@click.option("--limit-train", type=int, default=None, help="Override: stratified training subset size.")
@click.option("--limit-test", type=int, default=None, help="Override: stratified test subset size.")
@click.option("--width", type=float, default=None, help="Override: conv width multiplier of the paper's widths.")
@click.option("--data-root", default=None)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--one-at-a-time", is_flag=True, help="Train the runs one by one instead of as one stack per phase.")
@click.option("--compile", "compile_", is_flag=True, help="Conv rows: torch.compile the DLNPF runs' training forward.")
@click.option(
    "--regimes",
    default=None,
    help="Comma-separated subset of relu,frnpf-ii,frnpf-di,dlnpf,flnpf (default: all five; flnpf needs relu).",
)
@click.option("--out", default="runs/table", show_default=True)
def reproduce_table(
    rows,
    seeds,
    budget,
    epochs,
    limit_train,
    limit_test,
    width,
    data_root,
    device,
    one_at_a_time,
    compile_,
    regimes,
    out,
):
    """The paper's table: 5 regimes per row, our mean ± std beside the paper's; records, table.md and a bar chart."""
    overrides = dict(epochs=epochs, limit_train=limit_train, limit_test=limit_test, width=width)
    _table(rows, seeds, budget, out, overrides, not one_at_a_time, regimes, data_root, device, compile_)


@reproduce.command("budget")
@click.option("--grid", default="cpu", show_default=True, help="cpu (the measured grid, hours) | tiny (a smoke test)")
@click.option("--arch", default="gconv", show_default=True, help="gconv | vconv")
@click.option("--limit-test", type=int, default=None, help="Evaluate on a stratified test subset (default: all).")
@click.option("--points", default=None, help="Train only these points of the grid, e.g. w0.5-n10000 (comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every run (another seed: another --out).")
@_where("runs/budget")
def reproduce_budget(grid, arch, limit_test, points, seed, data_root, device, out):
    """ReLU - FRNPF-II against training budget (width, images, epochs) on CIFAR-10: where the paper's order appears."""
    from .errors import check_choice
    from .experiments import budget

    check_choice("arch", arch, ("gconv", "vconv"))
    _echo_run(
        budget.run,
        out,
        grid=grid,
        arch=arch,
        limit_test=limit_test,
        points=points,
        seed=seed,
        data_root=data_root,
        device=device,
    )


@reproduce.command("dlgn")
@_shown(
    "--budget",
    "cpu",
    "quick (20 epochs, 1 seed) | cpu (300 epochs, 3 seeds) | paper (the authors' 1,500 epochs, 3 seeds)",
)
@click.option("--sets", default="sd-i,sd-ii,sd-iii", show_default=True, help="Comma-separated oblique-tree sets.")
@click.option("--cifar", is_flag=True, help="Instead: a conv DLGN beside its ReLU net on CIFAR-10 (CPU conv budget).")
@click.option("--epochs", type=int, default=None, help="Override the budget's epochs.")
@click.option("--seeds", type=int, default=None, help="Override the budget's seeds.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default="runs/dlgn", show_default=True)
def reproduce_dlgn(budget, sets, cifar, epochs, seeds, device, out):
    """DLGN, DLGN-SF, a ReLU net and KRR on the DLGN's NPK on the oblique-decision-tree sets; 2-D hyperplane plot.
    With --cifar: a convolutional DLGN beside its ReLU network on CIFAR-10."""
    from .experiments import dlgn

    if cifar:
        from .errors import check_positive_int

        ctx = click.get_current_context()
        given = [
            f"--{k}" for k in ("budget", "sets") if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT
        ]
        if given:  # the CIFAR run has its own settings (CPU conv budget): these would be ignored
            from .errors import NeuralpathError

            one = len(given) == 1
            raise NeuralpathError(
                f"{' and '.join(given)} {'is' if one else 'are'} for the oblique-tree runs; --cifar would ignore "
                f"{'it' if one else 'them'}: drop {'it' if one else 'them'}"
            )
        for flag, v in (("--seeds", seeds), ("--epochs", epochs)):
            if v is not None:
                check_positive_int(flag, v)
        seeds, epochs = 3 if seeds is None else seeds, 12 if epochs is None else epochs
        _echo_run(dlgn.run_cifar, out, seeds=seeds, epochs=epochs, device=device)
        return
    _echo_run(
        dlgn.run,
        out,
        budget,
        sets=[s.strip() for s in sets.split(",") if s.strip()],
        epochs=epochs,
        seeds=seeds,
        device=device,
    )


@reproduce.command("gates")
@click.option(
    "--budget", default="quick", show_default=True, help="quick (10 epochs, 10,000 images) | paper (100, all)"
)
@click.option("--epochs", type=int, default=None)
@click.option("--pairs", type=int, default=None, help="Segments per kind (same / different class) for the regions.")
@click.option(
    "--run",
    "run_dir",
    default=None,
    help="Measure an existing ReLU FC run folder's epoch_K.pt snapshots (train it with --save-every) instead.",
)
@_where("runs/gates")
def reproduce_gates(budget, epochs, pairs, run_dir, data_root, device, out):
    """Gate dynamics during training: flips, activation patterns, class sub-network overlap, regions on segments."""
    from .experiments import gates

    _echo_run(gates.run, out, budget, epochs=epochs, pairs=pairs, data_root=data_root, device=device, run_dir=run_dir)


@reproduce.command("resnet")
@click.option("--budget", default="cpu", show_default=True, help="cpu (12 epochs, 10,000 images, 3 seeds) | quick")
@click.option("--seeds", type=int, default=None)
@click.option("--epochs", type=int, default=None)
@_where("runs/resnet")
def reproduce_resnet(budget, seeds, epochs, data_root, device, out):
    """A CIFAR ResNet as ReLU, FRNPF-II and FLNPF, and kernel ridge regression on the NPK of its gates."""
    from .experiments import resnet

    _echo_run(resnet.run, out, budget, seeds=seeds, epochs=epochs, data_root=data_root, device=device)


@reproduce.command("theorem")
@click.option("--budget", default="quick", show_default=True, help="quick | full")
@_where("runs/theorem", device="cpu", device_help="cpu | cuda | auto (kernels in float64)")
def reproduce_theorem(budget, data_root, device, out):
    """Theorem 5.1: E[K^v] = d sigma^(2(d-1)) H, and one draw converging like w^(-1/2)."""
    from .errors import check_choice
    from .experiments import theorem

    check_choice("budget", budget, ("quick", "full"))
    from .train import resolve_device

    _check_out_folder(out)
    theorem.run(out, quick=budget == "quick", env=_env(data_root, str(resolve_device(device))))
    from pathlib import Path

    click.echo((Path(out) / "theorem.md").read_text())
    click.echo(f"records: {Path(out) / 'theorem.jsonl'}   plot: {Path(out) / 'theorem.png'}")


@reproduce.command("nu")
@click.option("--budget", default="quick", show_default=True, help="quick (2 runs, 10 epochs, 4000 images) | paper")
@click.option("--runs", type=int, default=None, help="Override the number of runs.")
@click.option("--epochs", type=int, default=None, help="Override the epochs.")
@_where("runs/nu", device_help="auto | cpu | cuda | cuda:N")
def reproduce_nu(budget, runs, epochs, data_root, device, out):
    """nu_t = y^T (H_t/trace H_t)^-1 y on binary MNIST 4 vs 7 (Cholesky solve, jitter recorded)."""
    from .experiments import nu

    _echo_run(nu.run, out, budget, runs=runs, epochs=epochs, data_root=data_root, device=device)


@reproduce.command("ntk-split")
@click.option("--budget", default="quick", show_default=True, help="quick (10 epochs, 6000 images) | paper (60 epochs)")
@click.option("--epochs", type=int, default=None)
@_where("runs/ntk-split", device_help="auto | cpu | cuda (training; kernels on the CPU)")
def reproduce_ntk_split(budget, epochs, data_root, device, out):
    """K^v and K^f of DLNPF during training: trace, Frobenius norm, alignment every 5 epochs."""
    from .experiments import ntk_split

    _echo_run(ntk_split.run, out, budget, epochs=epochs, data_root=data_root, device=device)


@reproduce.command("continuous")
@_shown(
    "--budget", "quick", "quick (FC, MNIST, minutes) | cpu (GCONV x1/4, 10,000 CIFAR-10 images, 3 seeds, hours) | paper"
)
@click.option(
    "--arch",
    default=None,
    help="gconv (the paper's; default of --budget cpu|paper) | vconv | fc (MNIST; " "default of --budget quick)",
)
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 (mean ± std per stage).")
@click.option("--stages", type=int, default=None)
@click.option("--step", type=int, default=None, help="ReLU epochs between stages.")
@click.option("--stage-epochs", type=int, default=None, help="Epochs each stage trains.")
@click.option("--limit-train", type=int, default=None)
@_where("runs/continuous")
def reproduce_continuous(budget, arch, seeds, stages, step, stage_epochs, limit_train, data_root, device, out):
    """Continuous NPF learning: FLNPF with gates copied from a ReLU net after 0, step, 2 step, ... epochs."""
    from .experiments import continuous

    _echo_run(
        continuous.run,
        out,
        budget,
        arch=arch,
        seeds=seeds,
        stages=stages,
        step=step,
        stage_epochs=stage_epochs,
        limit_train=limit_train,
        data_root=data_root,
        device=device,
    )


@reproduce.command("kernels")
@click.option("--budget", default=None, help="quick (10k/2k images, 3 epochs; the default) | paper")
@click.option("--arch", default=None, help="fc (MNIST; the default) | vconv | gconv (CIFAR-10)")
@click.option("--n-train", type=int, default=None, help="Training images (default: the budget's; 3,000, --relu-run).")
@click.option("--n-test", type=int, default=None, help="Test images (default: the budget's; 1,000, --relu-run).")
@click.option("--epochs", type=int, default=None)
@click.option("--data-root", default=None)
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto")
@click.option(
    "--relu-run",
    default=None,
    help="Use these finished ReLU runs, comma-separated (e.g. runs/table-cpu/runs/gconv-adam/relu-s0,...): "
    "their initial and trained gates' NPK, no training; mean +- std over the runs.",
)
@click.option("--out", default="runs/kernels", show_default=True)
def reproduce_kernels(budget, arch, n_train, n_test, epochs, data_root, device, relu_run, out):
    """Kernel ridge regression and an SVM on the NPK of evolving gates, and on the final NTK."""
    from .experiments import kernel_machines

    if relu_run:
        given = [f for f, v in (("--budget", budget), ("--arch", arch), ("--epochs", epochs)) if v is not None]
        if given:  # they describe the training run --relu-run replaces: they would be ignored
            from .errors import NeuralpathError

            raise NeuralpathError(
                f"{', '.join(given)}: --relu-run uses trained runs as they are (no training); drop {', '.join(given)}"
            )
        n_train, n_test = 3000 if n_train is None else n_train, 1000 if n_test is None else n_test
        runs = _commas("--relu-run", relu_run, "RUN1,RUN2")
        _echo_run(kernel_machines.run_on_run, out, runs, n_train, n_test, data_root=data_root, device=device)
        return
    _echo_run(
        kernel_machines.run,
        out,
        budget or "quick",
        arch=arch or "fc",
        n_train=n_train,
        n_test=n_test,
        epochs=epochs,
        data_root=data_root,
        device=device,
    )


@cli.group()
def report():
    """Regenerate a table or plot from committed records (no training)."""


@report.command("collect")
@click.argument("source")
@click.argument("dest")
def report_collect(source, dest):
    """Copy the small records of an experiment folder (config.json, data.json, metrics.jsonl, result.json of every
    run; the experiment's .jsonl/.md/.png files) into DEST, leaving checkpoints and data behind: what docs/results
    holds."""
    import shutil
    from pathlib import Path

    from .errors import NeuralpathError
    from .io import atomic_path

    src, dst = Path(source), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"{source}: no such experiment folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise NeuralpathError(f"DEST {dest} is {source} or inside it; give a folder elsewhere (e.g. docs/results/X)")
    keep = {"config.json", "data.json", "metrics.jsonl", "result.json"}  # data.json: which copy of the data
    # a run still training (config.json, no result.json yet) is left out: its records would be read as finished
    unfinished = {
        c.parent for c in src.rglob("config.json") if c.parent != src and not (c.parent / "result.json").is_file()
    }
    n = 0
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.parent in unfinished:
            continue
        top = p.parent == src
        if p.name in keep or (top and p.suffix in (".jsonl", ".md", ".png", ".json")):
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(q) as tmp:  # a reader of DEST never sees half a file
                shutil.copyfile(p, tmp)
            n += 1
    left = f"; {len(unfinished)} unfinished run(s) left out (no result.json yet)" if unfinished else ""
    click.echo(f"{n} record files copied from {src} to {dst}{left}")


@report.command("table")
@click.argument("records")
@click.option("--out", default=None, help="Folder for table.md and table.png (default: beside the records).")
def report_table(records, out):
    """The paper's table from a runs.jsonl written by `reproduce table`."""
    from pathlib import Path

    from .experiments import table
    from .io import read_jsonl, write_text

    p = Path(records)
    if not p.is_file():
        raise FileNotFoundError(f"{records}: no such records file (a runs.jsonl from `reproduce table`)")
    recs = table.check_records(read_jsonl(p, strict=True), records)
    if not recs:
        raise ValueError(f"{records}: holds no records")
    rows = [r for r in table.ROWS if any(x["row"] == r for x in recs)]
    md = table.table_markdown(recs, rows)
    o = Path(out) if out else p.parent
    write_text(o / "table.md", md)
    table.plot(table.summarise(recs, rows), rows, o / "table.png")
    click.echo(md)


@kernel.command("fit")
@click.option("--checkpoint", default=None, help="A run folder (its best.pt) or checkpoint; default: a fresh network.")
@click.option("--module", "module", default=None, help="Your own ReLU model: pkg.module:factory.")
@click.option("--weights", default=None, help="With --module: a state_dict file for the model.")
@click.option("--arch", default=None, help="A fresh network: fc | vconv | gconv (default fc).")
@click.option("--regime", default=None, help="A fresh network's regime (default relu).")
@click.option("--seed", type=int, default=None, help="A fresh network's seed (default 0).")
@click.option("--dataset", default=None)
@click.option("--kernel", "kind", default="npk", show_default=True, help="npk | ntk")
@click.option("--method", default="krr", show_default=True, help="krr | svm")
@click.option("--n-train", type=int, default=10000, show_default=True)
@click.option("--n-test", type=int, default=2000, show_default=True)
@click.option("--data-root", default=None)
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto (kernels in float64)")
@click.option("--out", default=None, help="Append the result record to this JSON-lines file.")
def kernel_fit(
    checkpoint, module, weights, arch, regime, seed, dataset, kind, method, n_train, n_test, data_root, device, out
):
    """Fit kernel ridge regression or an SVM on a network's NPK or NTK; print the test accuracy."""
    import time

    from . import datasets
    from .errors import check_choice
    from .experiments.kernel_machines import kernels_for
    from .io import append_jsonl
    from .kernels.machines import accuracy, fit_predict

    check_choice("kernel", kind, ("npk", "ntk"))
    check_choice("method", method, ("krr", "svm"))
    from .errors import NeuralpathError

    if n_train == 1:
        raise NeuralpathError("--n-train 1: a kernel machine needs at least 2 training points")
    if out and Path(out).is_dir():
        raise NeuralpathError(f"--out {out} is a folder; give a JSON-lines file to append the record to")
    net, xtr, _ = _kernel_setup(
        checkpoint,
        arch,
        regime,
        None,
        None,
        seed,
        dataset,
        "train",
        n_train,
        data_root,
        "float64",
        device,
        module,
        weights,
        n_flag="--n-train",
    )
    ds = dataset or "mnist"
    if checkpoint:
        from . import checkpoints

        ds = dataset or checkpoints.load(checkpoint)["config"].get("dataset", "mnist")
    datasets.check_limit("--n-test", n_test, ds, "test", root=data_root)
    _, ytr = datasets.load(ds, "train", root=data_root, limit=n_train, seed=0)
    xte, yte = datasets.load(ds, "test", root=data_root, limit=n_test, seed=0)
    t = time.time()
    K, Kt = kernels_for(net, xtr, xte, kind)
    pred, info = fit_predict(method, K, ytr, Kt)
    rec = {
        "kernel": kind,
        "method": method,
        "checkpoint": checkpoint,
        "n_train": n_train,
        "n_test": n_test,
        "test_acc": accuracy(pred, yte),
        "seconds": time.time() - t,
        **info,
    }
    if out:
        append_jsonl(out, rec)
    click.echo(
        f"{kind.upper()} + {method.upper()}: test accuracy {100 * rec['test_acc']:.2f}% "
        f"({n_train} train / {n_test} test, {rec['seconds']:.1f} s)" + (f"; record in {out}" if out else "")
    )


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like an exception: partial files are removed on the way out


def main(argv=None):
    # PyTorch's CPU allocator backs large tensors with transparent huge pages: a fresh pair-sized tensor of the
    # any-network NPK then costs a few page faults instead of one per 4 KiB (1.7x on its tiles here,
    # docs/PERFORMANCE.md). Read at the first large allocation; THP_MEM_ALLOC_ENABLE=0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            cli.main(args=argv, prog_name="neuralpath", standalone_mode=False)
        finally:
            from . import distributed

            distributed.shutdown()
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        click.echo(f"error: {_flagify(msg)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
