"""The training engine: one loop for every network, regime and experiment (arXiv 2006.10529, section 5).

:func:`fit` trains a *stack* of R runs (:mod:`neuralpath.stacks`; R = 1 is a single run) for any architecture: each
run has its own network (built by :func:`neuralpath.regimes.build_regime`, or by an experiment), seed, data order
and training subset; all runs take each optimiser step together. The loss and the optimiser are injectable (the
paper's tables use softmax cross-entropy with Adam (eps 1e-7) or plain SGD at batch 32; ``nu`` uses MSE with Keras'
RMSprop). Everything a run needs is kept here, once:

- data: a :class:`RunData` is resolved once per request (train/test tensors, each run's rows) and handed in;
- the data order of epoch e of a run depends only on (seed, e) (:func:`epoch_order`), so a killed run resumes to
  the bit-identical result: the state (every run's weights, the optimiser, the epoch, the best-so-far) is one atomic
  checkpoint, written at least every ``state_every_s`` seconds and at the end;
- the records of each run folder (:mod:`neuralpath.runfolder`): metrics.jsonl per epoch, best.pt (best test epoch:
  the authors' protocol and FLNPF's source), best_even.pt (best on the even half of the test set: the clean
  protocol's source), epoch_K.pt / best_at_K.pt every ``save_every`` epochs, result.json;
- a non-finite loss stops the stack with a message saying what is on disk;
- under torchrun every process takes a strided share of each run's global batch and the gradients are summed
  (all-reduce) before the step, so the update equals the single-process one; rank 0 evaluates and writes.

:func:`train` (one run from a :class:`TrainConfig`) and :func:`train_many` (a stack of configs, e.g. a table row)
are the entry points the CLI and the experiments use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints, datasets, distributed, precision
from .errors import NeuralpathError, check_choice, check_positive_int
from .io import append_jsonl, hash_tensor, write_json
from .nets import FCDGN
from .regimes import ARCHS, REGIMES, build_regime
from .runfolder import RunFolder
from .stacks import make_stack

OPTIMIZERS = ("adam", "sgd", "rmsprop")
# (arch, optimiser) -> (learning rate, epochs): the authors' settings (arXiv 2006.10529, section 5 and its code)
PAPER_DEFAULTS = {
    ("fc", "adam"): (1e-4, 100),
    ("fc", "sgd"): (1e-2, 300),
    ("vconv", "adam"): (3e-4, 80),
    ("vconv", "sgd"): (1e-2, 80),
    ("gconv", "adam"): (3e-4, 200),
    ("gconv", "sgd"): (1e-1, 100),
}
PAPER_WIDTHS = {"channels": (64, 64, 128, 128), "hidden": (256, 256)}


@dataclass
class TrainConfig:
    arch: str = "fc"
    dataset: str = "mnist"
    regime: str = "relu"
    optimizer: str = "adam"
    lr: float | None = None  # None: the paper's value for (arch, optimizer)
    epochs: int | None = None  # None: the paper's value for (arch, optimizer)
    batch_size: int = 32  # the authors' batch size in every run
    seed: int = 0
    width: int | None = None  # fc: 128 (the paper's FC-MNIST width); resnet: 16 (its first stage's channels)
    depth: int = 6  # fc only: 5 gated hidden layers + output
    blocks: list | None = None  # resnet only: basic blocks per stage, default (1, 1, 1) (ResNet-8)
    channels: list | None = None  # conv only: override (64, 64, 128, 128)
    hidden: list | None = None  # conv only: override (256, 256)
    bias: bool = True  # the authors' Keras layers have biases; the theory is bias-free
    gating: str = "relu"  # the feature network: ReLU (the paper), linear (DLGN) or shallow (DLGN-SF)
    value_input: str = "x"  # the value network's input: x, or all ones ("pwc")
    limit_train: int | None = None  # stratified, seeded subset of the training split
    limit_test: int | None = None
    val_split: float = 0.0  # fraction of the training split held out for model selection
    data_root: str | None = None
    device: str = "auto"
    save_every: int = 0  # also keep epoch_K.pt and best_at_K.pt every K epochs (0: never)
    relu_checkpoint: str | None = None
    per_rank_batch: bool = False  # torchrun: batch_size per process (default: the global batch, shared out)
    bf16: bool = False  # bfloat16 autocast for the training step (off: the paper's float32)
    compile: bool = False  # DLNPF conv runs: torch.compile (inductor) of the training forward (docs/PERFORMANCE.md)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        c = dataclasses.replace(self)
        check_choice("arch", c.arch, ARCHS)
        check_choice("regime", c.regime, REGIMES)
        check_choice("optimizer", c.optimizer, ("adam", "sgd"))
        check_choice("dataset", c.dataset, datasets.NAMES)
        _check_arch_settings(c)
        lr, ep = PAPER_DEFAULTS[("gconv" if c.arch == "resnet" else c.arch, c.optimizer)]
        c.lr = lr if c.lr is None else float(c.lr)
        c.epochs = ep if c.epochs is None else c.epochs
        if c.width is None:
            c.width = 16 if c.arch == "resnet" else 128
        if c.arch == "resnet" and c.blocks is None:
            c.blocks = [1, 1, 1]
        check_positive_int("epochs", c.epochs)
        check_positive_int("batch_size", c.batch_size)
        check_positive_int("width", c.width)
        if isinstance(c.depth, bool) or not isinstance(c.depth, int) or c.depth < 2:
            raise NeuralpathError(f"depth={c.depth!r} must be an integer >= 2")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise NeuralpathError(f"lr={c.lr!r} must be a positive number")
        if not 0.0 <= c.val_split < 1.0:
            raise NeuralpathError(f"val_split={c.val_split!r} must be in [0, 1)")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
            raise NeuralpathError(f"seed={c.seed!r} must be an integer >= 0")
        for name in ("limit_train", "limit_test"):
            v = getattr(c, name)
            if v is not None:
                check_positive_int(name, v)
        if isinstance(c.save_every, bool) or not isinstance(c.save_every, int) or c.save_every < 0:
            raise NeuralpathError(f"save_every={c.save_every!r} must be an integer >= 0")
        for name in ("channels", "hidden"):
            v = getattr(c, name)
            if v is not None:
                setattr(
                    c,
                    name,
                    [
                        check_positive_int(f"{name} entry", int(x))
                        if not isinstance(x, bool)
                        else check_positive_int(f"{name} entry", x)
                        for x in v
                    ],
                )
        check_choice("gating", c.gating, ("relu", "linear", "shallow"))
        check_choice("value_input", c.value_input, ("x", "ones"))
        if c.blocks is not None:
            if c.arch != "resnet":
                raise NeuralpathError(f"blocks={c.blocks!r} is for arch 'resnet' only (arch is {c.arch!r})")
            c.blocks = [check_positive_int("blocks entry", x) for x in c.blocks]
            if not 1 <= len(c.blocks) <= 4:
                raise NeuralpathError(f"blocks={c.blocks!r} must have 1 to 4 stages, e.g. 1,1,1")
        if c.regime == "relu" and (c.gating != "relu" or c.value_input != "x"):
            raise NeuralpathError("regime 'relu' is the ReLU network: it takes gating='relu' and value_input='x'")
        if c.regime == "flnpf" and not c.relu_checkpoint:
            raise NeuralpathError("regime 'flnpf' needs --relu-checkpoint RUN_DIR_OR_FILE (a trained ReLU run)")
        if c.regime != "flnpf" and c.relu_checkpoint:  # it would be ignored: the run would not start from it
            raise NeuralpathError(
                f"--relu-checkpoint is read by regime 'flnpf' only (its frozen gates); regime {c.regime!r} would "
                "ignore it: drop it, or use --regime flnpf"
            )
        if not re.fullmatch(r"cuda:\d+", str(c.device)):  # cuda:N picks one GPU of several
            check_choice("device", c.device, ("auto", "cpu", "cuda"))
        return c


def _check_arch_settings(c: TrainConfig):
    """Refuse a setting the chosen architecture would not read (the run would silently train another network)."""
    conv = c.arch in ("vconv", "gconv")
    # 128 is what resolved() writes into every run's config (conv runs' config.json included), so it passes
    if conv and c.width not in (None, 128):
        raise NeuralpathError(
            f"width={c.width!r} is read by arch 'fc' and 'resnet' only; a {c.arch} network's widths are channels= "
            "and hidden= (TrainConfig), or a multiplier of the paper's widths: reproduce table --width MULT"
        )
    if c.arch != "fc" and c.depth != 6:
        raise NeuralpathError(
            f"depth={c.depth!r} is read by arch 'fc' only; {c.arch!r} has its own depth "
            + ("(blocks=)" if c.arch == "resnet" else "(channels= and hidden=)")
        )
    if not conv and (c.channels or c.hidden):
        raise NeuralpathError(f"channels=/hidden= are read by arch 'vconv' and 'gconv' only (arch is {c.arch!r})")
    if c.compile and (c.regime != "dlnpf" or not conv):
        raise NeuralpathError(
            f"compile=True is for DLNPF runs of vconv/gconv (where it was measured to help; docs/PERFORMANCE.md), "
            f"not regime {c.regime!r} of arch {c.arch!r}; drop it"
        )
    if c.arch == "resnet" and (c.gating != "relu" or c.value_input != "x" or not c.bias):
        raise NeuralpathError(
            "arch 'resnet' is trained with the paper's gating (gating='relu', value_input='x') and biases; "
            f"got gating={c.gating!r}, value_input={c.value_input!r}, bias={c.bias!r}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeuralpathError(f"device={name!r} requested but CUDA is not available here; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise NeuralpathError(
                f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
            )
    return torch.device(name)


def versions() -> dict:
    from . import __version__

    return {
        "neuralpath": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": _pillow_version(),
        "python": platform.python_version(),
        "cpu": _cpu(),
    }


def _cpu() -> str:
    """The CPU's kernel level as torch dispatches it (e.g. 'AVX2', 'AVX512') and its model: float32 results of the
    same code differ in rounding from one to another, and a long run's trajectory with them."""
    level = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name, family, model = (info.get(k, "?") for k in ("model name", "cpu family", "model"))
        return f"{level}; {name} family {family} model {model}"
    except (OSError, ValueError):
        return f"{level}; {platform.processor() or platform.machine()}"


def _pillow_version() -> str | None:
    """Pillow decodes the JPEG copy of CIFAR-10: another release can decode a few pixels differently."""
    try:
        import PIL
    except ImportError:
        return None
    return PIL.__version__


# -- data: resolved once per request -----------------------------------------------------------------------------
@dataclass
class RunData:
    """The tensors a request trains and evaluates on: the full training split (each run picks its rows from it),
    the test split, and the label of the copy in use (e.g. 'CIFAR-10 (JPEG copy)')."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    label: str = ""

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])

    @functools.cached_property
    def digest(self) -> str:
        """A digest of the four tensors (dtype, shape, bytes): two runs with equal digests saw the same numbers. Kept
        in each run's data.json and result.json, so that a rerun that differs can tell a changed decode (another
        Pillow, another copy) from a changed computation."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            hash_tensor(h, t)
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        if self.y_train.is_floating_point():
            return 1
        top = self.y_train.max() if len(self.y_test) == 0 else torch.maximum(self.y_train.max(), self.y_test.max())
        return int(top.item()) + 1

    @classmethod
    def load(cls, cfg: TrainConfig) -> "RunData":
        """The data of a config: its data set's training split (whole) and test split (``limit_test`` subset)."""
        kw: dict[str, Any] = dict(root=cfg.data_root)
        if cfg.dataset == "synthetic":
            kw = dict(shape=tuple(cfg.extra.get("shape", (1, 8, 8))))
        datasets.check_limit("--limit-train", cfg.limit_train, cfg.dataset, "train", **kw)
        datasets.check_limit("--limit-test", cfg.limit_test, cfg.dataset, "test", **kw)
        x, y = datasets.load(cfg.dataset, "train", **kw)
        xt, yt = datasets.load(cfg.dataset, "test", limit=cfg.limit_test, seed=0, **kw)
        return cls(x, y, xt, yt, datasets.source_label(cfg.dataset, cfg.data_root))


def train_val_indices(cfg: TrainConfig, y_full: torch.Tensor):
    """Indices into the full training split: (train, validation or None). The subset (``limit_train``) is
    stratified and seeded by the run's seed; the validation split (``val_split``) by 12345 + seed."""
    y = y_full.numpy()
    sub = np.arange(len(y))
    if cfg.limit_train:
        sub = datasets.stratified_indices(y, cfg.limit_train, seed=cfg.seed)
    if cfg.val_split <= 0:
        return torch.from_numpy(sub), None
    n_val = int(round(cfg.val_split * len(sub)))
    if n_val < 1 or n_val >= len(sub):
        raise NeuralpathError(
            f"--val-split {cfg.val_split} of {len(sub)} training images leaves "
            f"{len(sub) - n_val} to train on and {n_val} to validate; choose a split that keeps "
            "both non-empty"
        )
    vi = datasets.stratified_indices(y[sub], n_val, seed=12345 + cfg.seed)
    mask = np.ones(len(sub), dtype=bool)
    mask[vi] = False
    return torch.from_numpy(sub[mask]), torch.from_numpy(sub[vi])


def net_kwargs(cfg: TrainConfig, in_shape, out_dim) -> dict:
    kw: dict[str, Any] = dict(in_shape=tuple(in_shape), out_dim=out_dim, bias=cfg.bias)
    if cfg.gating != "relu" or cfg.value_input != "x":
        kw.update(gating=cfg.gating, value_input=cfg.value_input)
    if cfg.arch == "fc":
        kw.update(width=cfg.width, depth=cfg.depth)
    elif cfg.arch == "resnet":
        kw = dict(in_shape=tuple(in_shape), out_dim=out_dim, width=cfg.width, blocks=tuple(cfg.blocks or (1, 1, 1)))
    else:
        if cfg.channels:
            kw["channels"] = tuple(cfg.channels)
        if cfg.hidden:
            kw["hidden"] = tuple(cfg.hidden)
    return kw


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch depends only on (seed, epoch): what makes resume exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch)))


# -- losses and optimisers ----------------------------------------------------------------------------------------
class Loss:
    """A per-example loss and its notion of a correct prediction."""

    name = "loss"

    def __call__(self, out, y):  # (b, k), (b,) -> (b,)
        raise NotImplementedError

    def correct(self, out, y):
        raise NotImplementedError


class CrossEntropy(Loss):
    """Softmax cross-entropy on the logits; correct = argmax equals the label (the paper's tables)."""

    name = "ce"

    def __call__(self, out, y):
        return F.cross_entropy(out, y, reduction="none")

    def correct(self, out, y):
        return out.argmax(-1) == y


class SquaredError(Loss):
    """(yhat - y)^2 on one output, y in {-1, +1}; correct = the sign agrees (the nu_t experiment)."""

    name = "mse"

    def __call__(self, out, y):
        return (out[..., 0] - y) ** 2

    def correct(self, out, y):
        return (out[..., 0] > 0) == (y > 0)


class BinaryCrossEntropy(Loss):
    """Logistic loss on one output logit, y in {0, 1}; correct = the logit's sign agrees (the DLGN benchmark)."""

    name = "bce"

    def __call__(self, out, y):
        return F.binary_cross_entropy_with_logits(out[..., 0], y.to(out.dtype), reduction="none")

    def correct(self, out, y):
        return (out[..., 0] > 0) == (y > 0)


LOSSES = {"ce": CrossEntropy, "mse": SquaredError, "bce": BinaryCrossEntropy}


def make_optimizer(name, params, lr):
    """The authors' optimisers with Keras' defaults: Adam (eps 1e-7), plain SGD, RMSprop (rho 0.9, eps 1e-7)."""
    if callable(name):
        return name(params, lr)
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "adam":
        # fused: one pass over (param, grad, m, v) per step instead of ~a dozen foreach passes; 5x faster on VCONV's
        # 33.5 M-weight dense layer (docs/PERFORMANCE.md, session 5); equal to the foreach update to float rounding
        return torch.optim.Adam(params, lr=lr, eps=1e-7, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, foreach=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.0, foreach=True)


@dataclass
class FitOptions:
    optimizer: str | Callable = "adam"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 32
    loss: str | Loss = "ce"
    device: str = "auto"
    save_every: int = 0
    fast: bool = True  # FC stacks as batched products (tested equal to the loop)
    per_rank_batch: bool = False
    eval_batch: int | None = None  # None: 1000 rows for FC stacks; 32 for conv nets (3x faster per image on this
    # CPU than 1000: the activations of small batches stay in cache)
    state_every_s: float = 60.0  # write the resumable state at least this often (and after the last epoch)
    bf16: bool = False  # bfloat16 autocast for forward and loss
    flush_denormal: bool = True  # treat subnormal floats as zero on the CPU (x86 FTZ/DAZ): the DLGN's linear
    # gating chains produce them, and they made its steps 9x slower here


@dataclass
class RunSpec:
    """One run of a stack: its network (regime applied), seed (data order), training rows, folder and identity."""

    net: torch.nn.Module
    seed: int
    train_idx: torch.Tensor
    val_idx: torch.Tensor | None = None
    folder: RunFolder | None = None
    config: dict = field(default_factory=dict)
    label: str = "run"
    compile: bool = False  # torch.compile its training forward (a run whose feature network trains, run one by one)


FRESH_BEST = {
    "best_test_acc": -1.0,
    "best_epoch": 0,
    "best_even_acc": -1.0,
    "best_even_epoch": 0,
    "clean_test_acc": None,
    "best_val_acc": -1.0,
    "best_val_epoch": 0,
    "test_acc_at_best_val": None,
}


@torch.no_grad()
def _evaluate(stack, x, y, loss, device, batch, idx=None):
    """Per-run (mean loss, accuracy, accuracy on even rows, on odd rows): on shared (x, y), or with ``idx`` (R, m)
    on run r's own rows x[idx[r]]. Four (R,) float64 tensors."""
    R = stack.R
    if len(y) == 0 or (idx is not None and idx.shape[1] == 0):  # nothing to evaluate on (e.g. an experiment's net)
        nan = torch.full((R,), float("nan"), dtype=torch.float64)
        return nan, nan, nan, nan
    stack.train(False)
    tot = torch.zeros(R, dtype=torch.float64)
    hits = []
    m = len(y) if idx is None else idx.shape[1]
    for i in range(0, m, batch):
        if idx is None:
            xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
            out = stack.forward_shared(xb)  # (R, b, k)
            yr = yb.expand(R, *yb.shape)
        else:
            ib = idx[:, i : i + batch].to(device)
            out, yr = stack.forward(x[ib]), y[ib]
        tot += loss(out.reshape(-1, out.shape[-1]), yr.reshape(-1)).reshape(R, -1).sum(1).double().cpu()
        hits.append(loss.correct(out, yr).double().cpu())
    stack.train(True)
    h = torch.cat(hits, 1)  # (R, m)
    return tot / m, h.mean(1), h[:, 0::2].mean(1), h[:, 1::2].mean(1)


def _allreduce_grads(params, world):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    distributed.all_reduce_sum(flat)
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()


def fit(
    runs: list[RunSpec],
    data: RunData,
    opts: FitOptions,
    *,
    state_path=None,
    resume: bool = False,
    progress: bool | None = None,
    log: Callable = print,
    on_epoch: Callable | None = None,
) -> list[dict]:
    """Train the runs as one stack; returns each run's result record (also written to its folder's result.json).

    ``state_path``: the resumable state (None: nothing is saved, e.g. experiments that keep networks in memory).
    ``on_epoch(epoch, nets)``: called after each epoch with the networks (current weights); its return value, a
    dict, is merged into each run's metric record. On return every ``runs[r].net`` holds the final weights.
    """
    from tqdm import tqdm

    loss = opts.loss if isinstance(opts.loss, Loss) else LOSSES[check_choice("loss", opts.loss, tuple(LOSSES))]()
    R = len(runs)
    n = len(runs[0].train_idx)
    if any(len(r.train_idx) != n for r in runs):
        raise NeuralpathError("runs of one stack must have training sets of one size")
    device = resolve_device(opts.device)
    if opts.flush_denormal:
        torch.set_flush_denormal(True)  # process-wide; FitOptions(flush_denormal=False) leaves it alone
    rank, world, local = distributed.init(device.type)
    main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
    gbatch = opts.batch_size * (world if opts.per_rank_batch else 1)
    for r in runs:
        r.net.to(device)
    stack = make_stack([r.net for r in runs], fast=opts.fast).to(device)
    if any(r.compile for r in runs):
        stack.compile_runs([r.compile for r in runs])
    eval_batch = opts.eval_batch or (1000 if all(isinstance(r.net, FCDGN) for r in runs) else 32)
    params = stack.parameters()
    opt: Any = make_optimizer(opts.optimizer, params, opts.lr)
    best = [dict(FRESH_BEST) for _ in range(R)]
    start = 1
    state_path = Path(state_path) if state_path is not None else None
    folders = [r.folder for r in runs]
    if state_path is not None and resume and state_path.exists():
        ck = checkpoints.load(state_path, require=("models", "optimizer", "epoch"))
        if ck.get("runs") != [str(f.path) if f else None for f in folders]:
            raise NeuralpathError(
                f"{state_path} holds the state of other runs ({len(ck.get('runs', []))}); remove it "
                "or pick another --out"
            )
        for r, sd in enumerate(ck["models"]):
            stack.load_state_dict_of(r, sd)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, best = int(ck["epoch"]) + 1, [dict(FRESH_BEST, **b) for b in ck["best"]]
        distributed.barrier()  # every rank has read the state before rank 0 rewrites the records
        if main:
            for f in folders:
                if f is not None:
                    f.truncate(start - 1)
    elif main:
        for r in runs:
            if r.folder is not None:
                r.folder.start(
                    dict(r.config, world_size=world) if world > 1 else r.config, data=data.label, digest=data.digest
                )
    xtr = data.x_train.to(device)
    ytr = data.y_train.to(device)
    tr_idx = torch.stack([r.train_idx for r in runs]).to(device)  # (R, n): rows of the full training split
    va_idx = torch.stack([r.val_idx for r in runs if r.val_idx is not None]) if runs[0].val_idx is not None else None
    seeds = [r.seed for r in runs]
    if start <= opts.epochs:
        stack.cache_frozen_gates(xtr, [r.train_idx.to(device) for r in runs])
    quiet = not sys.stderr.isatty() if progress is None else not progress
    bar = tqdm(
        range(start, opts.epochs + 1),
        initial=start - 1,
        total=opts.epochs,
        leave=False,
        disable=(not main) or quiet,
        desc=runs[0].label if R == 1 else f"stack of {R} runs",
    )
    last_state = time.time()
    te_acc = None
    t_fit = time.time()
    for epoch in bar:
        t0 = time.time()
        order = torch.stack([epoch_order(n, s, epoch) for s in seeds]).to(device)  # (R, n)
        order = torch.gather(tr_idx, 1, order)  # rows of the full split, in this epoch's order per run
        tot_loss = torch.zeros(R, dtype=torch.float64, device=device)
        tot_hit = torch.zeros(R, dtype=torch.float64, device=device)
        for i in range(0, n, gbatch):
            rows = order[:, i : i + gbatch]
            b = rows.shape[1]
            if world > 1:
                rows = rows[:, rank::world]  # this process's share of every run's batch
            xb = xtr[rows]  # (R, b_local, ...)
            yb = ytr[rows]
            with precision.autocast(device, opts.bf16):
                out = stack.forward(xb, rows)  # (R, b_local, k)
                o = out.reshape(-1, out.shape[-1])
                per = loss(o.float() if o.dtype in (torch.bfloat16, torch.float16) else o, yb.reshape(-1)).reshape(
                    R, -1
                )
            opt.zero_grad(set_to_none=True)
            (per.sum() / b).backward()  # each run's mean over its global batch: run r's gradient is its own
            if world > 1:
                _allreduce_grads(params, world)
            opt.step()
            tot_loss += per.detach().sum(1)
            tot_hit += loss.correct(out.detach(), yb).sum(1)
        if world > 1:
            distributed.all_reduce_sum(tot_loss)
            distributed.all_reduce_sum(tot_hit)
        train_loss, train_acc = (tot_loss / n).tolist(), (tot_hit / n).tolist()
        bad = [runs[r].label for r in range(R) if not math.isfinite(train_loss[r])]
        if bad:
            if state_path is not None and state_path.exists():
                ep = checkpoints.load(state_path, require=("epoch",))["epoch"]
                kept = f"the state after epoch {ep} is kept in {state_path} (resume continues from there)"
            else:
                kept = "nothing was saved (it diverged before the first state was written)"
            raise NeuralpathError(
                f"training diverged: the loss is not finite in epoch {epoch} for {', '.join(bad)}; "
                f"{kept} (try a smaller --lr)"
            )
        if not main:  # rank 0 evaluates and writes; the others wait for it
            distributed.barrier()
            continue
        te = _evaluate(stack, data.x_test, data.y_test, loss, device, eval_batch)
        va = _evaluate(stack, xtr, ytr, loss, device, eval_batch, idx=va_idx) if va_idx is not None else None
        te_acc = te[1]
        secs = time.time() - t0
        extra = None
        if on_epoch is not None:
            stack.sync()
            extra = on_epoch(epoch, [r.net for r in runs])  # None or one dict per run, merged into its record
        for r, run in enumerate(runs):
            rec = {
                "epoch": epoch,
                "train_loss": train_loss[r],
                "train_acc": train_acc[r],
                "test_loss": float(te[0][r]),
                "test_acc": float(te[1][r]),
                "test_acc_even": float(te[2][r]),
                "test_acc_odd": float(te[3][r]),
                "seconds": secs / R,
            }
            bst = best[r]
            improved = rec["test_acc"] > bst["best_test_acc"]
            if improved:
                bst.update(best_test_acc=rec["test_acc"], best_epoch=epoch)
            improved_even = rec["test_acc_even"] > bst["best_even_acc"]
            if improved_even:
                bst.update(
                    best_even_acc=rec["test_acc_even"], best_even_epoch=epoch, clean_test_acc=rec["test_acc_odd"]
                )
            if va is not None:
                rec["val_loss"], rec["val_acc"] = float(va[0][r]), float(va[1][r])
                if rec["val_acc"] > bst["best_val_acc"]:
                    bst.update(best_val_acc=rec["val_acc"], best_val_epoch=epoch, test_acc_at_best_val=rec["test_acc"])
            if extra:
                rec.update(extra[r])
            f = run.folder
            if f is not None:
                sd = None
                if improved or improved_even or (opts.save_every and epoch % opts.save_every == 0):
                    sd = stack.state_dict_of(r)
                ck = {"model": sd, "config": run.config, "net": _net_config(run.net), "epoch": epoch}
                if improved:
                    checkpoints.save(f.file("best.pt"), ck)
                if improved_even:
                    checkpoints.save(f.file("best_even.pt"), ck)
                if opts.save_every and epoch % opts.save_every == 0:
                    checkpoints.save(f.file(f"epoch_{epoch}.pt"), ck)
                    _copy_atomic(f.file("best.pt"), f.file(f"best_at_{epoch}.pt"))
                append_jsonl(f.file("metrics.jsonl"), rec)
        if state_path is not None and (epoch in (start, opts.epochs) or time.time() - last_state >= opts.state_every_s):
            _save_state(state_path, stack, runs, opt, epoch, best)
            last_state = time.time()
        msg = (
            f"epoch {epoch}/{opts.epochs}: loss {np.mean(train_loss):.4f}, test acc "
            + (f"{float(te[1][0]):.4f}" if R == 1 else f"{float(te[1].mean()):.4f} (mean of {R} runs)")
            + f", {secs:.1f} s"
        )
        bar.set_postfix_str(msg.split(": ", 1)[1])
        if quiet and progress is None and main:
            log(f"{runs[0].label if R == 1 else f'stack of {R} runs'}: {msg}")
        distributed.barrier()
    bar.close()
    stack.sync()  # final weights back into the caller's networks
    if not main:
        distributed.barrier()
        return [f.result() if f else {} for f in folders]
    results = []
    ver = versions()  # once per request (it reads /proc/cpuinfo)
    for r, run in enumerate(runs):
        recs = run.folder.records() if run.folder else []
        final = float(te_acc[r]) if te_acc is not None else (recs[-1]["test_acc"] if recs else None)
        res = dict(
            best[r],
            final_test_acc=final,
            epochs=opts.epochs,
            config=run.config,
            versions=ver,
            device=str(device),
            data=data.label,
            data_digest=data.digest,
            threads=torch.get_num_threads(),
            stack_of=R,
            seconds=time.time() - t_fit,
        )
        if run.folder is not None:
            write_json(run.folder.file("result.json"), res)
        results.append(res)
    distributed.barrier()
    return results


def _net_config(net) -> dict | None:
    cfg = getattr(net, "config", None)
    out = cfg() if callable(cfg) else None
    return out if isinstance(out, dict) else None


def _copy_atomic(src: Path, dst: Path):
    from .io import atomic_path

    if src.exists():
        with atomic_path(dst, ".pt") as tmp:
            shutil.copyfile(src, tmp)


def _save_state(path, stack, runs, opt, epoch, best):
    models = [stack.state_dict_of(r) for r in range(len(runs))]
    ck = {
        "runs": [str(r.folder.path) if r.folder else None for r in runs],
        "models": models,
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "best": best,
        "rng": torch.get_rng_state(),
    }
    if len(runs) == 1:  # a single run's last.pt doubles as a checkpoint of its network
        ck.update(model=models[0], config=runs[0].config, net=_net_config(runs[0].net))
    checkpoints.save(path, ck)


# -- entry points: runs from configs ------------------------------------------------------------------------------
def value_init_seed(regime: str, seed: int) -> int:
    """The seed of a run's initialisation. FLNPF's value network is drawn from a stream independent of every other
    regime's (the paper builds a fresh model for it), so FLNPF seed s does not start at Theta_0 of the ReLU run s
    whose gates it freezes."""
    if regime != "flnpf":
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"flnpf-value-{int(seed)}".encode()).digest()[:6], "little")


def load_relu_state(cfg: TrainConfig):
    """FLNPF: the state_dict of the trained ReLU run named by ``cfg.relu_checkpoint``, checked to be a ReLU run of
    the same architecture and data set; None for the other regimes."""
    if cfg.regime != "flnpf":
        return None
    ck = checkpoints.load(cfg.relu_checkpoint)
    want = "relu" if cfg.gating == "relu" else "dlnpf"  # linear gates come from a trained DLGN (its gating network)
    if ck["config"].get("regime") != want:
        raise NeuralpathError(
            f"{cfg.relu_checkpoint}: is a {ck['config'].get('regime')!r} run, not a {want!r} run"
            + ("" if want == "relu" else f" (FLNPF with gating={cfg.gating!r} freezes a trained DLGN's gating network)")
        )
    keys = ("arch", "dataset", "bias", "gating", "value_input") + {
        "fc": ("width", "depth"),
        "resnet": ("width", "blocks"),
    }.get(cfg.arch, ("channels", "hidden"))
    for k in keys:
        if k in ck["config"] and ck["config"][k] != getattr(cfg, k):
            raise NeuralpathError(
                f"{cfg.relu_checkpoint}: checkpoint has {k}={ck['config'][k]!r} but this run "
                f"has {k}={getattr(cfg, k)!r}; use a source run of the same architecture"
            )
    return ck["model"]


def identity(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def run_spec(cfg: TrainConfig, data: RunData, out=None) -> RunSpec:
    """The RunSpec of a resolved config: its network (regime applied) and rows."""
    tr, va = train_val_indices(cfg, data.y_train)
    net, _ = build_regime(
        cfg.regime,
        cfg.arch,
        value_init_seed(cfg.regime, cfg.seed),
        load_relu_state(cfg),
        **net_kwargs(cfg, data.in_shape, data.num_classes),
    )
    return RunSpec(
        net=net,
        seed=cfg.seed,
        train_idx=tr,
        val_idx=va,
        folder=RunFolder(out) if out else None,
        config=identity(cfg),
        label=f"{cfg.regime} {cfg.arch} seed {cfg.seed}",
        compile=cfg.compile,
    )


SHARED = (
    "arch",
    "dataset",
    "optimizer",
    "lr",
    "epochs",
    "batch_size",
    "width",
    "depth",
    "blocks",
    "channels",
    "hidden",
    "bias",
    "limit_train",
    "limit_test",
    "val_split",
    "data_root",
    "device",
    "save_every",
    "per_rank_batch",
    "bf16",
)


def train_many(
    cfgs,
    outs,
    state_path,
    resume: bool = True,
    progress: bool | None = None,
    data: RunData | None = None,
    log: Callable = print,
    allow_change=(),
    fast: bool = True,
    state_every_s: float = 60.0,
) -> list[dict]:
    """Train the runs ``cfgs`` as one stack, each into its folder ``outs[i]``; the stack's resumable state is
    ``state_path``. Finished runs with the same config are not retrained (their record is returned); a folder that
    holds a run of another config is refused (naming the keys), unless ``allow_change`` admits the difference."""
    cfgs = [c.resolved() for c in cfgs]
    if len(cfgs) != len(outs) or not cfgs:
        raise NeuralpathError("train_many needs one output folder per config (and at least one run)")
    base = cfgs[0]
    for c in cfgs[1:]:
        for k in SHARED:
            if getattr(c, k) != getattr(base, k):
                raise NeuralpathError(f"runs of one stack must share {k}: {getattr(base, k)!r} vs {getattr(c, k)!r}")
    folders = [RunFolder(o) for o in outs]
    held = []
    failed = True
    distributed.init(resolve_device(base.device).type)
    try:
        if distributed.is_main():
            for f in sorted(folders, key=lambda f: str(f.path)):
                held.append(f.acquire())
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        modes = [f.check_request(identity(c), resume, allow_change, defaults) for f, c in zip(folders, cfgs)]
        distributed.barrier()  # every process has judged the folders before rank 0 writes them
        results = {i: f.result() for i, (f, m) in enumerate(zip(folders, modes)) if m == "done"}
        todo = [i for i, m in enumerate(modes) if m != "done"]
        if not todo:
            failed = False
            return [results[i] for i in range(len(cfgs))]
        extend = [i for i in todo if modes[i] == "extend"]
        data = data if data is not None else RunData.load(base)
        # a run continues on the copy of the data it started on (not the JPEG copy of CIFAR-10, then the official
        # files fetched into the same --data-root since): checked before an extended run's result is removed
        for i in todo:
            before = folders[i].data()
            if modes[i] != "new" and before and data.label and before != data.label:
                raise NeuralpathError(
                    f"{folders[i].path} was trained on {before}; the data found now is {data.label}: point "
                    "--data-root at the copy it trained on, or pick another --out"
                )
            was = folders[i].data_digest()
            if modes[i] != "new" and was and was != data.digest:  # same copy, other numbers: say so, go on
                log(
                    f"warning: {folders[i].path} started on data with digest {was}; the data decoded now has "
                    f"{data.digest} (another Pillow or copy?): the run continues on the data of now"
                )
        if extend and not Path(state_path).exists():  # nothing to continue from: a fresh start would replace records
            f = folders[extend[0]]
            raise NeuralpathError(
                f"{f.path} is a finished run of {f.result().get('epochs', '?')} epochs whose saved state "
                f"({state_path}) is gone, so it cannot be trained for more epochs; train the longer run in another "
                "--out"
            )
        for i in extend:  # a finished run asked for more epochs: continue from its state
            folders[i].file("result.json").unlink()
        specs = [run_spec(cfgs[i], data, outs[i]) for i in todo]
        for i, s in zip(todo, specs):
            s.folder = folders[i]
        state_path = Path(state_path)
        if state_path.exists() and resume:
            ck = checkpoints.load(state_path, require=("runs",))
            if ck.get("runs") != [str(folders[i].path) for i in todo]:
                if any(not RunFolder(p).finished for p in ck.get("runs", []) if p):
                    raise NeuralpathError(
                        f"{state_path} belongs to another, unfinished set of runs; finish those "
                        "runs or remove the file to start afresh"
                    )
                state_path.unlink()  # left by a stack whose runs all finished (e.g. seed 0 before --seeds 5)
        elif state_path.exists() and not resume:
            raise NeuralpathError(f"{state_path} exists; pass --resume to continue it or pick another --out")
        opts = FitOptions(
            optimizer=base.optimizer,
            lr=base.lr,
            epochs=base.epochs,
            batch_size=base.batch_size,
            device=base.device,
            save_every=base.save_every,
            fast=fast,
            per_rank_batch=base.per_rank_batch,
            state_every_s=state_every_s,
            bf16=base.bf16,
        )
        res = fit(specs, data, opts, state_path=state_path, resume=resume, progress=progress, log=log)
        for i, r in zip(todo, res):
            if modes[i] == "extend":
                r["extended"] = True
            results[i] = r
        for i in extend:
            write_json(folders[i].file("result.json"), results[i])
        failed = False
        return [results[i] for i in range(len(cfgs))]
    finally:
        for f in held:
            f.release(failed=failed)


def train(
    cfg: TrainConfig,
    out,
    resume: bool = False,
    progress: bool | None = None,
    log: Callable = print,
    data: RunData | None = None,
    allow_change=(),
) -> dict:
    """Train one run into the folder ``out`` and return its result record (also ``out/result.json``)."""
    out = Path(out)
    return train_many(
        [cfg], [out], out / "last.pt", resume=resume, progress=progress, data=data, log=log, allow_change=allow_change
    )[0]
