"""One training loop for every regime (SPEC §3, §5): batch 32, Adam (eps 1e-7) or plain SGD, softmax cross-entropy.

A run folder holds: config.json, metrics.jsonl (one record per epoch), last.pt (model, optimiser, epoch, RNG;
written atomically every epoch), best.pt (model of the best test epoch: the authors' FLNPF source),
epoch_K.pt every --save-every K epochs, and result.json at the end. ``resume=True`` continues after a kill so that
the final result equals that of an uninterrupted run (on CPU, same seed): the data order of epoch e depends only
on (seed, e).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints, datasets, distributed
from .errors import NeuralpathError, check_choice, check_positive_int
from .io import append_jsonl, read_jsonl, write_json, write_text
from .regimes import ARCHS, REGIMES, build_regime

OPTIMIZERS = ("adam", "sgd")
# (arch, optimiser) -> (learning rate, epochs): the authors' settings (SPEC §5)
PAPER_DEFAULTS = {("fc", "adam"): (1e-4, 100), ("fc", "sgd"): (1e-2, 300), ("vconv", "adam"): (3e-4, 80),
                  ("vconv", "sgd"): (1e-2, 80), ("gconv", "adam"): (3e-4, 200), ("gconv", "sgd"): (1e-1, 100)}


@dataclass
class TrainConfig:
    arch: str = "fc"
    dataset: str = "mnist"
    regime: str = "relu"
    optimizer: str = "adam"
    lr: float | None = None          # None: the paper's value for (arch, optimizer)
    epochs: int | None = None        # None: the paper's value for (arch, optimizer)
    batch_size: int = 32             # the authors' batch size in every run
    seed: int = 0
    width: int = 128                 # fc only: the paper's FC-MNIST width
    depth: int = 6                   # fc only: 5 gated hidden layers + output
    channels: list | None = None     # conv only: override (64, 64, 128, 128)
    hidden: list | None = None       # conv only: override (256, 256)
    limit_train: int | None = None   # stratified, seeded subset of the training split
    limit_test: int | None = None
    val_split: float = 0.0           # fraction of the training split held out for model selection (clean protocol)
    data_root: str | None = None
    device: str = "auto"
    save_every: int = 0              # also keep epoch_K.pt every K epochs (0: never)
    relu_checkpoint: str | None = None
    per_rank_batch: bool = False     # torchrun: batch_size per process (default: global batch, split among ranks)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        c = dataclasses.replace(self)
        check_choice("arch", c.arch, ARCHS)
        check_choice("regime", c.regime, REGIMES)
        check_choice("optimizer", c.optimizer, OPTIMIZERS)
        check_choice("dataset", c.dataset, datasets.NAMES)
        lr, ep = PAPER_DEFAULTS[(c.arch, c.optimizer)]
        c.lr = lr if c.lr is None else float(c.lr)
        c.epochs = ep if c.epochs is None else c.epochs
        check_positive_int("epochs", c.epochs)
        check_positive_int("batch_size", c.batch_size)
        check_positive_int("width", c.width)
        if isinstance(c.depth, bool) or not isinstance(c.depth, int) or c.depth < 2:
            raise NeuralpathError(f"depth={c.depth!r} must be an integer >= 2")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise NeuralpathError(f"lr={c.lr!r} must be a positive number")
        if not 0.0 <= c.val_split < 1.0:
            raise NeuralpathError(f"val_split={c.val_split!r} must be in [0, 1)")
        for name in ("limit_train", "limit_test"):
            v = getattr(c, name)
            if v is not None:
                check_positive_int(name, v)
        if c.regime == "flnpf" and not c.relu_checkpoint:
            raise NeuralpathError("regime 'flnpf' needs --relu-checkpoint RUN_DIR_OR_FILE (a trained ReLU run)")
        check_choice("device", c.device, ("auto", "cpu", "cuda"))
        return c


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NeuralpathError("device='cuda' requested but CUDA is not available here; use --device cpu")
    return torch.device(name)


def versions() -> dict:
    from . import __version__
    return {"neuralpath": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def load_train_full(cfg: TrainConfig):
    """The whole training split of the config's data set (subsets are chosen by :func:`train_val_indices`)."""
    kw = dict(root=cfg.data_root)
    if cfg.dataset == "synthetic":
        kw = dict(shape=tuple(cfg.extra.get("shape", (1, 8, 8))))
    return datasets.load(cfg.dataset, "train", **kw)


def load_test(cfg: TrainConfig):
    kw = dict(root=cfg.data_root)
    if cfg.dataset == "synthetic":
        kw = dict(shape=tuple(cfg.extra.get("shape", (1, 8, 8))))
    return datasets.load(cfg.dataset, "test", limit=cfg.limit_test, seed=0, **kw)


def train_val_indices(cfg: TrainConfig, y_full: torch.Tensor):
    """Indices into the full training split: (train, validation or None). The subset (``limit_train``) is
    stratified and seeded by the run's seed; the validation split (``val_split``) by 12345 + seed."""
    y = y_full.numpy()
    sub = np.arange(len(y))
    if cfg.limit_train:
        sub = datasets.stratified_indices(y, cfg.limit_train, seed=cfg.seed)
    if cfg.val_split <= 0:
        return torch.from_numpy(sub), None
    n_val = max(1, int(round(cfg.val_split * len(sub))))
    vi = datasets.stratified_indices(y[sub], n_val, seed=12345 + cfg.seed)
    mask = np.ones(len(sub), dtype=bool)
    mask[vi] = False
    return torch.from_numpy(sub[mask]), torch.from_numpy(sub[vi])


def load_data(cfg: TrainConfig):
    """((x_tr, y_tr), (x_val, y_val) or None, (x_te, y_te)) for a config."""
    x, y = load_train_full(cfg)
    tr, va = train_val_indices(cfg, y)
    val = None if va is None else (x[va], y[va])
    return (x[tr], y[tr]), val, load_test(cfg)


def net_kwargs(cfg: TrainConfig, in_shape, out_dim) -> dict:
    kw = dict(in_shape=tuple(in_shape), out_dim=out_dim)
    if cfg.arch == "fc":
        kw.update(width=cfg.width, depth=cfg.depth)
    else:
        if cfg.channels:
            kw["channels"] = tuple(cfg.channels)
        if cfg.hidden:
            kw["hidden"] = tuple(cfg.hidden)
    return kw


def make_optimizer(name, params, lr):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-7)  # Keras' epsilon
    return torch.optim.SGD(params, lr=lr, momentum=0.0)


@torch.no_grad()
def evaluate(net, x, y, device, batch: int = 1000, halves: bool = False):
    """(mean loss, accuracy) on (x, y); with ``halves`` also the accuracies on the even and odd rows, which the
    tables use for a clean protocol (select the epoch on one half, report the other)."""
    net.eval()
    loss, correct = 0.0, 0
    ok = []
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        out = net(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        hit = out.argmax(1) == yb
        correct += hit.sum().item()
        ok.append(hit.cpu())
    net.train()
    if not halves:
        return loss / len(y), correct / len(y)
    ok = torch.cat(ok).double()
    return loss / len(y), correct / len(y), ok[0::2].mean().item(), ok[1::2].mean().item()


def clean_accuracy(records) -> float | None:
    """Test accuracy without selecting on the reported data: pick the epoch by the even half of the test set and
    report the odd half, and the other way round; the mean of the two."""
    recs = [r for r in records if "test_acc_even" in r]
    if not recs:
        return None
    a = max(recs, key=lambda r: r["test_acc_even"])["test_acc_odd"]
    b = max(recs, key=lambda r: r["test_acc_odd"])["test_acc_even"]
    return (a + b) / 2


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch depends only on (seed, epoch): what makes resume exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch)))


def load_relu_state(cfg: TrainConfig):
    """FLNPF: the state_dict of the trained ReLU run named by ``cfg.relu_checkpoint``, checked to be a ReLU run of
    the same architecture and data set; None for the other regimes."""
    if cfg.regime != "flnpf":
        return None
    ck = checkpoints.load(cfg.relu_checkpoint)
    if ck["config"].get("regime") != "relu":
        raise NeuralpathError(f"{cfg.relu_checkpoint}: is a {ck['config'].get('regime')!r} run, not a 'relu' run")
    for k in ("arch", "width", "depth", "channels", "hidden", "dataset"):
        if k in ck["config"] and ck["config"][k] != getattr(cfg, k) and not (cfg.arch != "fc" and k in ("width", "depth")):
            raise NeuralpathError(f"{cfg.relu_checkpoint}: checkpoint has {k}={ck['config'][k]!r} but this run "
                                  f"has {k}={getattr(cfg, k)!r}; use a ReLU run of the same architecture")
    return ck["model"]


def train(cfg: TrainConfig, out, resume: bool = False, progress: bool | None = None, log=print,
          data=None) -> dict:
    """Train one run and return its result record (also written to ``out/result.json``)."""
    from tqdm import tqdm
    cfg = cfg.resolved()
    out = Path(out)
    if (out / "result.json").exists() and not resume:
        raise NeuralpathError(f"{out} already holds a finished run; use --resume to reuse it or pick another --out")
    if resume and (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if not resume and (out / "last.pt").exists():
        raise NeuralpathError(f"{out} holds an unfinished run; pass --resume to continue it or pick another --out")
    device = resolve_device(cfg.device)
    rank, world, local = distributed.init(device.type)
    main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
    per_rank = cfg.batch_size if (world == 1 or cfg.per_rank_batch) else cfg.batch_size // world
    if world > 1 and not cfg.per_rank_batch and cfg.batch_size % world:
        raise NeuralpathError(f"batch_size={cfg.batch_size} is the global batch and must divide among {world} "
                              "processes; change --batch-size or pass --per-rank-batch")
    relu_state = load_relu_state(cfg)
    (xtr, ytr), val, (xte, yte) = data if data is not None else load_data(cfg)
    out_dim = int(max(ytr.max(), yte.max()).item()) + 1 if cfg.dataset == "synthetic" else 10
    net, params = build_regime(cfg.regime, cfg.arch, cfg.seed, relu_state, **net_kwargs(cfg, xtr.shape[1:], out_dim))
    net.to(device)
    opt = make_optimizer(cfg.optimizer, params, cfg.lr)
    model = net
    if world > 1:  # gradients of the trainable parameters are averaged; a frozen feature net is not synchronised
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None)
    cdict = dataclasses.asdict(cfg)
    start, best = 1, {"best_test_acc": -1.0, "best_epoch": 0, "best_val_acc": -1.0, "best_val_epoch": 0,
                      "test_acc_at_best_val": None}
    if resume and (out / "last.pt").exists():
        ck = checkpoints.load(out / "last.pt")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, best = int(ck["epoch"]) + 1, dict(ck["best"])
        recs = [r for r in read_jsonl(out / "metrics.jsonl") if r["epoch"] < start]
        distributed.barrier()  # every rank has read last.pt and metrics before rank 0 rewrites them
        if main:
            write_text(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dict(cdict, world_size=world) if world > 1 else cdict)
        write_text(out / "metrics.jsonl", "")
    n = len(ytr)
    bar = tqdm(range(start, cfg.epochs + 1), initial=start - 1, total=cfg.epochs,
               disable=(not main) or (None if progress is None else not progress),
               desc=f"{cfg.regime} {cfg.arch} seed {cfg.seed}", leave=False)
    xtr_d, ytr_d = xtr.to(device), ytr.to(device)
    for epoch in bar:
        t0 = time.time()
        if world > 1:  # torch's DistributedSampler: one seeded permutation per epoch, a strided share per rank
            from torch.utils.data import DistributedSampler
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(sampler)), device=device)
        else:
            order = epoch_order(n, cfg.seed, epoch).to(device)
        tot_loss, tot_correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(0, len(order), per_rank):
            idx = order[i:i + per_rank]
            xb, yb = xtr_d[idx], ytr_d[idx]
            out_b = model(xb)
            loss = F.cross_entropy(out_b, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach() * len(idx)
            tot_correct += (out_b.detach().argmax(1) == yb).sum()
        seen = torch.tensor(float(len(order)), device=device)
        if world > 1:
            for t in (tot_loss, tot_correct, seen):
                distributed.all_reduce_sum(t)
        train_loss = tot_loss.item() / seen.item()
        if not math.isfinite(train_loss):
            raise NeuralpathError(f"training diverged: loss is {train_loss} in epoch {epoch}; the last good checkpoint "
                                  f"is kept in {out / 'last.pt'} (try a smaller --lr)")
        if not main:  # rank 0 evaluates and writes; the others wait for it
            distributed.barrier()
            continue
        test_loss, test_acc, acc_even, acc_odd = evaluate(net, xte, yte, device, halves=True)
        rec = {"epoch": epoch, "train_loss": train_loss, "train_acc": tot_correct.item() / seen.item(),
               "test_loss": test_loss, "test_acc": test_acc, "test_acc_even": acc_even, "test_acc_odd": acc_odd,
               "seconds": time.time() - t0}
        is_best = test_acc > best["best_test_acc"]
        if is_best:
            best.update(best_test_acc=test_acc, best_epoch=epoch)
        if val is not None:
            rec["val_loss"], rec["val_acc"] = evaluate(net, val[0], val[1], device)
            if rec["val_acc"] > best["best_val_acc"]:
                best.update(best_val_acc=rec["val_acc"], best_val_epoch=epoch, test_acc_at_best_val=test_acc)
        model_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        if is_best:
            checkpoints.save(out / "best.pt", {"model": model_state, "config": cdict, "epoch": epoch})
        if cfg.save_every and epoch % cfg.save_every == 0:
            checkpoints.save(out / f"epoch_{epoch}.pt", {"model": model_state, "config": cdict, "epoch": epoch})
        append_jsonl(out / "metrics.jsonl", rec)
        checkpoints.save(out / "last.pt", {"model": model_state, "optimizer": opt.state_dict(), "config": cdict,
                                            "epoch": epoch, "best": best, "rng": torch.get_rng_state()})
        bar.set_postfix(loss=f"{train_loss:.3f}", test=f"{test_acc:.4f}")
        distributed.barrier()
    bar.close()
    if not main:
        distributed.barrier()
        return json.loads((out / "result.json").read_text())
    result = dict(best, clean_test_acc=clean_accuracy(read_jsonl(out / "metrics.jsonl")), final_test_acc=test_acc if cfg.epochs >= start else read_jsonl(out / "metrics.jsonl")[-1]["test_acc"],
                  epochs=cfg.epochs, config=cdict, versions=versions(), device=str(device),
                  data=datasets.source_label(cfg.dataset, cfg.data_root))
    write_json(out / "result.json", result)
    distributed.barrier()
    return result
