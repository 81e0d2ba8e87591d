"""The ``neuralpath`` command line: data, train, kernel, reproduce. Errors print one line and exit non-zero."""
from __future__ import annotations

import json
import sys

import click

from .errors import NeuralpathError

USER_ERRORS = (NeuralpathError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    rep = datasets.fetch(name, root, mirrors=list(mirrors) or None, progress=sys.stderr.isatty(),
                         log=lambda m: click.echo(m, err=True))
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


# -- train ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--arch", default="fc", show_default=True, help="fc | vconv | gconv")
@click.option("--dataset", default="mnist", show_default=True, help="mnist | fashion-mnist | cifar10 | synthetic")
@click.option("--regime", default="relu", show_default=True, help="relu | dlnpf | flnpf | frnpf-ii | frnpf-di")
@click.option("--optimizer", default="adam", show_default=True, help="adam | sgd")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the paper's for arch/optimizer).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the paper's for arch/optimizer).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--width", type=int, default=128, show_default=True, help="fc width.")
@click.option("--depth", type=int, default=6, show_default=True, help="fc depth d (d-1 gated hidden layers).")
@click.option("--relu-checkpoint", default=None, help="FLNPF: a ReLU run folder (its best.pt) or a checkpoint file.")
@click.option("--limit-train", type=int, default=None, help="Train on a stratified subset of this size.")
@click.option("--limit-test", type=int, default=None, help="Evaluate on a stratified subset of this size.")
@click.option("--val-split", type=float, default=0.0, show_default=True, help="Fraction held out for validation.")
@click.option("--data-root", default=None)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--save-every", type=int, default=0, show_default=True, help="Keep epoch_K.pt every K epochs.")
@click.option("--out", required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def train(out, resume, **kw):
    """Train one network in one regime; writes metrics.jsonl, checkpoints and result.json to --out."""
    from .train import TrainConfig
    from .train import train as run
    cfg = TrainConfig(**kw)
    res = run(cfg, out, resume=resume)
    click.echo(f"best test accuracy {res['best_test_acc']:.4f} (epoch {res['best_epoch']}), final "
               f"{res['final_test_acc']:.4f}; records in {out}")


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="neuralpath", standalone_mode=False)
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
        click.echo(f"error: {msg}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
