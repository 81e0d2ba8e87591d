"""How the gates of a ReLU network change while it learns (beyond the paper; docs/THEORY.md §10).

A ReLU FC net (the paper's 6x128, Adam 1e-4) is trained on MNIST with a checkpoint after every epoch; from the
checkpoints (epoch 0 = the same seed's initialisation), on a fixed probe set of test images (100 per class):
(a) the fraction of gates that flip between consecutive epochs, per layer; (b) distinct activation patterns per layer
and for the whole network; (c) the per-class overlap of active sub-networks (within class against between classes);
(d) the exact number of linear regions crossed by segments between pairs of test images (same class and different
class), at initialisation and after training; and, at initialisation, the same count for networks of equal neuron
count but different depth (the Hanin-Rolnick anchor: the count follows the number of neurons, not the depth).

compute (:func:`run`) -> records (``gates.jsonl``) -> report (:func:`report`) -> plots (:func:`plot`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoints, datasets
from ..gatestats import class_overlap, distinct_patterns, flip_fraction, hard_gates, regions_along_segment
from ..io import read_jsonl
from ..nets import FCDGN
from ..regimes import build_regime
from ..train import TrainConfig, net_kwargs, train
from .common import Env, budget_settings, mean_std, publish, pyplot, savefig, seeded_fc, write_jsonl

BUDGETS = {"quick": dict(epochs=10, limit_train=10000, pairs=20), "paper": dict(epochs=100, limit_train=None, pairs=50)}


def run(
    out,
    budget="quick",
    seed=0,
    epochs=None,
    pairs=None,
    run_dir=None,
    env: Env | None = None,
) -> str:
    """Train a ReLU FC 6x128 on MNIST with a checkpoint every epoch (or, with ``run_dir``, read an existing ReLU FC
    run trained with ``--save-every``), and measure its gates at every checkpoint on a fixed probe."""
    env = env or Env()
    b = budget_settings(BUDGETS, budget, epochs=epochs, pairs=pairs)
    out = Path(out)
    t0 = time.time()
    if run_dir is not None:
        rc, snapshots = _existing_run(run_dir, epochs)
        b.update(epochs=snapshots[-1][0], limit_train=rc.limit_train, source=str(run_dir))
    else:
        cfg = TrainConfig(
            arch="fc",
            dataset="mnist",
            regime="relu",
            optimizer="adam",
            lr=1e-4,
            epochs=b["epochs"],
            seed=seed,
            limit_train=b["limit_train"],
            save_every=1,
            data_root=env.data_root,
            device=env.device,
        )
        env.log(f"training the ReLU FC 6x128 ({b['epochs']} epochs, checkpoint every epoch) into {out / 'relu'}")
        train(cfg, out / "relu", resume=True, progress=env.progress, log=env.log)
        rc = cfg.resolved()
        snapshots = [(ep, out / "relu" / f"epoch_{ep}.pt") for ep in range(1, b["epochs"] + 1)]
    b["describe"] = _describe(rc, b)
    xp, yp = datasets.load(rc.dataset, "test", root=env.data_root)
    probe = torch.from_numpy(np.concatenate([np.flatnonzero(yp.numpy() == c)[:100] for c in range(10)]))
    x, y = xp[probe].flatten(1).double(), yp[probe]
    g = torch.Generator().manual_seed(1)
    same, diff = [], []
    while len(same) < b["pairs"] or len(diff) < b["pairs"]:
        i, j = torch.randint(0, len(y), (2,), generator=g).tolist()
        if i != j and y[i] == y[j] and len(same) < b["pairs"]:
            same.append((i, j))
        elif y[i] != y[j] and len(diff) < b["pairs"]:
            diff.append((i, j))
    recs, prev = [], None
    in_shape = tuple(xp.shape[1:])
    last = snapshots[-1][0]
    every = max(1, last // 5)
    for ep, ck in [(0, None), *snapshots]:
        net = initial_net(rc, in_shape)
        if ck is not None:
            net.load_state_dict(checkpoints.load(ck)["model"])
        net = net.double()
        gs = hard_gates(net, x)
        per, whole = distinct_patterns(gs)
        ov = class_overlap(gs, y)
        rec = {
            "epoch": ep,
            "patterns": per,
            "patterns_network": whole,
            "n_probe": len(y),
            "flip": flip_fraction(prev, gs) if prev is not None else None,
            "overlap": [m.tolist() for m in ov],
            "within": [float(m.diagonal().mean()) for m in ov],
            "between": [float((m.sum() - m.diagonal().sum()) / (m.numel() - len(m))) for m in ov],
        }
        if ep in (0, last) or ep % every == 0:
            rec["regions_same"] = [regions_along_segment(net, x[i], x[j]) for i, j in same]
            rec["regions_diff"] = [regions_along_segment(net, x[i], x[j]) for i, j in diff]
        recs.append(rec)
        prev = gs
        env.log(
            f"epoch {ep}: patterns {whole}, within/between overlap (last layer) {rec['within'][-1]:.3f}/"
            f"{rec['between'][-1]:.3f}"
        )
    # the Hanin-Rolnick anchor at initialisation: 640 neurons as 10x64, 5x128, 2x320; and 5x64, 5x256
    anchor = []
    for depth, width in ((11, 64), (6, 128), (3, 320), (6, 64), (6, 256)):
        counts = []
        for s in range(3 if b["pairs"] >= 10 else 1):
            net = seeded_fc(width, depth, 10, 100 + s, in_dim=x.shape[1], tied=True).double()  # the probe's inputs
            counts += [regions_along_segment(net, x[i], x[j]) for i, j in diff[:10]]
        m, sd = mean_std(counts)
        anchor.append(
            {
                "hidden_layers": depth - 1,
                "width": width,
                "neurons": (depth - 1) * width,
                "regions_mean": m,
                "regions_std": sd,
                "n": len(counts),
            }
        )
    write_jsonl(out / "gates.jsonl", recs + [dict(a, anchor=True) for a in anchor])
    return publish(out, "gates", report(recs, anchor, b), t0, out / "gates.jsonl", lambda png: plot(recs, out))


def initial_net(rc, in_shape, num_classes=10) -> FCDGN:
    """The run's initial network (epoch 0), rebuilt exactly as the engine draws it from the run's seed."""
    net = build_regime("relu", "fc", rc.seed, None, **net_kwargs(rc, in_shape, num_classes))[0]
    assert isinstance(net, FCDGN)
    return net


def _existing_run(run_dir, epochs=None):
    """(resolved config, [(epoch, checkpoint path), ...]) of a finished or running ReLU FC run with epoch_K.pt
    snapshots; anything else is refused in one line."""
    import json

    from ..errors import NeuralpathError

    d = Path(run_dir)
    if not (d / "config.json").is_file():
        raise NeuralpathError(f"--run {run_dir}: not a run folder (no config.json)")
    c = json.loads((d / "config.json").read_text())
    if c.get("arch") != "fc" or c.get("regime") != "relu" or c.get("gating", "relu") != "relu":
        raise NeuralpathError(
            f"--run {run_dir}: gate dynamics are measured for ReLU FC runs (this one is arch={c.get('arch')!r}, "
            f"regime={c.get('regime')!r})"
        )
    rc = TrainConfig(**{k: v for k, v in c.items() if k in TrainConfig.__dataclass_fields__}).resolved()
    snaps = sorted((int(p.stem.split("_")[1]), p) for p in d.glob("epoch_*.pt") if p.stem.split("_")[1].isdigit())
    if epochs is not None:
        snaps = [s for s in snaps if s[0] <= epochs]
    if not snaps:
        raise NeuralpathError(
            f"--run {run_dir}: no epoch_K.pt snapshots; train it with --save-every 1 (or K) to keep them"
        )
    return rc, snaps


def _describe(rc, b) -> str:
    src = f"run {b['source']}" if b.get("source") else f"seed {rc.seed}"
    return (
        f"a ReLU FC {rc.depth}x{rc.width} on {rc.dataset} ({rc.optimizer} {rc.lr:g}, {b['epochs']} epochs, "
        f"{rc.limit_train or 'all'} training images, {src})"
    )


def _split(path):
    rs = read_jsonl(path)
    return [r for r in rs if not r.get("anchor")], [r for r in rs if r.get("anchor")]


def report(recs, anchor, b) -> str:
    L = len(recs[0]["patterns"])
    lines = [
        f"# Gate dynamics of {b.get('describe') or 'a ReLU FC 6x128 on MNIST'}; probe: 1,000 test images, 100 "
        "per class",
        "",
        "| epoch | flips per layer % | distinct patterns per layer | whole network | within/between class overlap, "
        "last layer | regions same class | regions different class |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        fl = "—" if r["flip"] is None else " / ".join(f"{100 * f:.2f}" for f in r["flip"])
        rs = "—" if "regions_same" not in r else "{:.1f} ± {:.1f}".format(*mean_std(r["regions_same"]))
        rd = "—" if "regions_diff" not in r else "{:.1f} ± {:.1f}".format(*mean_std(r["regions_diff"]))
        lines.append(
            f"| {r['epoch']} | {fl} | {' / '.join(map(str, r['patterns']))} | {r['patterns_network']} | "
            f"{r['within'][-1]:.3f} / {r['between'][-1]:.3f} | {rs} | {rd} |"
        )
    lines += [
        "",
        f"Layers 1..{L}. Overlap: mean normalised overlap <g_x, g_x'>/sqrt(|g_x||g_x'|) of distinct pairs in "
        "one class (within) and of pairs across classes (between). Regions: linear regions crossed by the "
        "segment between two probe images (exact), mean ± std over the pairs.",
        "",
        "Linear regions crossed at initialisation (3 draws x 10 segments between images of different classes):",
        "",
        "| hidden layers x width | neurons | regions |",
        "|---|---|---|",
    ]
    for a in anchor:
        lines.append(
            f"| {a['hidden_layers']} x {a['width']} | {a['neurons']} | {a['regions_mean']:.1f} ± "
            f"{a['regions_std']:.1f} (n={a['n']}) |"
        )
    return "\n".join(lines) + "\n"


def plot(recs, out):
    plt = pyplot()
    L = len(recs[0]["patterns"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    eps = [r["epoch"] for r in recs if r["flip"] is not None]
    for l in range(L):
        axes[0].plot(
            eps, [100 * r["flip"][l] for r in recs if r["flip"] is not None], "o-", ms=3, label=f"layer {l + 1}"
        )
        axes[1].plot(
            [r["epoch"] for r in recs],
            [r["within"][l] - r["between"][l] for r in recs],
            "o-",
            ms=3,
            label=f"layer {l + 1}",
        )
    axes[0].set(xlabel="epoch", ylabel="gates flipped since the previous epoch (%)", title="(a) gate flips")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="epoch", ylabel="within - between class overlap", title="(c) class sub-networks separate")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    rr = [r for r in recs if "regions_same" in r]
    for key, fmt, label in (("regions_same", "o-", "same class"), ("regions_diff", "s-", "different classes")):
        ms = [mean_std(r[key]) for r in rr]
        axes[2].errorbar(
            [r["epoch"] for r in rr], [m for m, _ in ms], yerr=[s for _, s in ms], fmt=fmt, capsize=3, label=label
        )
    axes[2].set(xlabel="epoch", ylabel="linear regions on the segment", title="(d) regions between two test images")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, Path(out) / "gates.png")
    # class-overlap heat maps, last layer, first and last epoch
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, r in zip(axes, (recs[0], recs[-1])):
        im = ax.imshow(np.array(r["overlap"][-1]), cmap="viridis")
        ax.set_title(f"epoch {r['epoch']}: layer {L} overlap by class")
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    savefig(fig, Path(out) / "gates-overlap.png")
