"""Give back exactly the trained network: ``load_net(checkpoint)`` and ``load_run(folder)``.

Every checkpoint the training engine writes stores the network's configuration (``net``: gates, beta, eps, shapes,
tied) beside its weights and its run's training config; the weights also carry it (``_extra_state``), so they refuse
to load into a network of another configuration. Loading rebuilds the network from that configuration, never from
defaults (a DLNPF checkpoint rebuilt as ``FCDGN()`` would get hard gates and another accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoints
from .errors import NeuralpathError
from .nets import FCDGN, ConvDGN


def _resnet(cfg):
    import torch

    from .anynet import from_module
    from .regimes import make_resnet

    model = make_resnet(0, (cfg["in_channels"], 32, 32), cfg["out_dim"], cfg["width"], cfg["blocks"], cfg["bn"])
    return from_module(
        model,
        torch.zeros(1, cfg["in_channels"], 32, 32),
        gate=cfg["gate"],
        tied=cfg["tied"],
        beta=cfg["beta"],
        eps=cfg["eps"],
    )


NETS = {"fc": FCDGN, "vconv": ConvDGN, "gconv": ConvDGN, "resnet": _resnet}
FROZEN_REGIMES = ("flnpf", "frnpf-ii", "frnpf-di")


def net_from_config(cfg: dict):
    """A fresh network of the configuration ``net.config()`` returned (weights to be loaded)."""
    cfg = dict(cfg)
    arch = cfg.get("arch")
    if arch == "module":
        raise NeuralpathError(
            f"the checkpoint holds the DGN of a user model ({cfg.get('model')}); rebuild it with "
            "neuralpath.from_module(your_model, example) and load the 'model' entry"
        )
    if arch not in NETS:
        raise NeuralpathError(f"network configuration names arch={arch!r}; known: {', '.join(NETS)}")
    if arch in ("fc", "resnet"):
        return NETS[arch](cfg) if arch == "resnet" else NETS[arch](**{k: v for k, v in cfg.items() if k != "arch"})
    return NETS[arch](**cfg)


def load_net(path, map_location="cpu"):
    """The network of one checkpoint (best.pt, best_even.pt, epoch_K.pt, last.pt or a run folder's best.pt), with
    its weights; feature networks of frozen-gate regimes are frozen again."""
    return _net_of(checkpoints.load(path, map_location=map_location), path)


def _net_of(ck, path):
    sd = ck["model"]
    cfg = ck.get("net") or (sd.get("_extra_state") or {}).get("config")
    if not cfg:
        raise NeuralpathError(
            f"{path}: the checkpoint stores no network configuration (written by an older "
            "neuralpath); rebuild the network by hand and load its 'model' entry"
        )
    net = net_from_config(cfg)
    net.load_state_dict(sd)
    if ck.get("config", {}).get("regime") in FROZEN_REGIMES:
        net.freeze_features(True)
    return net


@dataclass
class Run:
    """A finished (or unfinished) run folder: its network at the best test epoch, config, result and records."""

    path: Path
    net: object
    config: dict
    result: dict | None
    records: list = field(default_factory=list)


def load_run(path, which: str = "best.pt", map_location="cpu") -> Run:
    """The run in folder ``path``: ``which`` picks the checkpoint (best.pt: the best test epoch; best_even.pt;
    last.pt; epoch_K.pt)."""
    from .runfolder import RunFolder

    f = RunFolder(path)
    if not f.path.is_dir():
        raise NeuralpathError(f"{path}: no such run folder")
    if not f.file(which).exists():
        raise NeuralpathError(
            f"{path}: no {which} in this run folder "
            f"(has: {', '.join(sorted(p.name for p in f.path.glob('*.pt'))) or 'no checkpoints'})"
        )
    ck = checkpoints.load(f.file(which), map_location=map_location)
    config = f.config() or {}
    stored = ck.get("config") or {}
    from .runfolder import CHANGEABLE  # (epochs: a resumed run may be trained longer than its best.pt knew)

    differ = sorted(k for k in set(config) & set(stored) - set(CHANGEABLE) if config[k] != stored[k])
    if differ:  # the folder's config.json would describe another network than the checkpoint holds
        k = differ[0]
        raise NeuralpathError(
            f"{path}: config.json says {k}={config[k]!r} but {which} was trained with {k}={stored[k]!r}"
            f"{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''}; the folder was edited or mixed"
        )
    return Run(
        path=f.path,
        net=_net_of(ck, f.file(which)),
        config=config,
        result=f.result() if f.finished else None,
        records=f.records(),
    )
