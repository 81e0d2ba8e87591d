"""Theorem 5.1 measured (arXiv 2006.10529; docs/THEORY.md §4).

For gates fixed independently of the value weights (FRNPF-II: a random frozen feature net; FLNPF: the hidden layers
of a trained ReLU net), bias-free, scalar output, value weights i.i.d. +-sigma (symmetric Bernoulli) or N(0, sigma^2)
with sigma = c / sqrt(w) in every layer:

    E[K^v(x, x')] = d sigma^(2(d-1)) H(x, x')            exactly, at any width (part a, Monte-Carlo)
    ||K^v / (d sigma^(2(d-1))) - H||_F / ||H||_F  ->  0   like w^(-1/2) for one draw (part b, log-log slope)

Part c measures the same ratio where the theorem does not apply: the standard ReLU net (gates depend on the
weights) and DLNPF (soft gates: K = K^v + K^f, the feature part included).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .. import datasets
from ..io import append_jsonl, write_text
from ..kernels.infinite import npk_infinite
from ..kernels.npk import npk
from ..kernels.ntk import ntk
from ..nets import FCDGN
from ..nets.base import init_layers
from ..train import FitOptions, RunData, RunSpec, fit
from .common import Env, seeded_fc

C = math.sqrt(2.0)


def _inputs(n, data_root, seed=0):
    try:
        x, _ = datasets.load("mnist", "train", root=data_root, limit=n, seed=seed)
        src = "MNIST"
    except (FileNotFoundError, ValueError):
        x, _ = datasets.load("synthetic", "train", n=n, shape=(1, 28, 28), seed=seed)
        src = "synthetic (MNIST not fetched)"
    return x.flatten(1).double(), src


def _gated_net(width, depth, seed, gates_from=None, in_dim=784):
    """Hard-gate, bias-free DGN with out_dim 1 and Gaussian (c/sqrt(fan_in)) feature weights, or the given ReLU
    net's hidden layers as frozen feature network (FLNPF)."""
    net = seeded_fc(width, depth, 1, seed, in_dim=in_dim, bias=False, init="gaussian").double()
    if gates_from is not None:
        for f, src in zip(net.feature_layers, gates_from.value_layers):
            f.weight.data.copy_(src.weight.data.double())
    net.freeze_features(True)
    return net


def _draw_value(net, width, init, seed):
    sigma = C / math.sqrt(width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.value_layers:
            w = layer.weight
            if init == "bernoulli":
                w.copy_((torch.randint(0, 2, w.shape, generator=g) * 2 - 1).double() * sigma)
            else:
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * sigma)
    return sigma


def _trained_relu(width, depth, data_root, seed, epochs=1, n=2000):
    """A briefly trained bias-free ReLU net (Adam 1e-3, batch 32, the training engine): the source of FLNPF's
    learnt gates."""
    net = seeded_fc(width, depth, 10, seed, bias=False, tied=True)
    try:
        x, y = datasets.load("mnist", "train", root=data_root, limit=n, seed=seed + 1)
    except (FileNotFoundError, ValueError):
        x, y = datasets.load("synthetic", "train", n=n, shape=(1, 28, 28), seed=seed + 1)
    data = RunData(x, y, x[:0], y[:0])
    fit(
        [RunSpec(net=net, seed=seed, train_idx=torch.arange(len(y)), label="theorem relu")],
        data,
        FitOptions(optimizer="adam", lr=1e-3, epochs=epochs, device="cpu", eval_batch=1000),
        progress=False,
    )
    return net


def rel_err(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def run(out, quick: bool = True, env: Env | None = None) -> dict:
    """Run parts a, b, c; append records to out/theorem.jsonl, write out/theorem.png and out/theorem.md."""
    env = env or Env(device="cpu")
    from pathlib import Path

    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs_path = out / "theorem.jsonl"
    if recs_path.exists():
        recs_path.unlink()
    n = 32 if quick else 64
    x, src = _inputs(n, env.data_root)
    x = x.to(env.device)
    widths = [16, 32, 64, 128, 256, 512] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    depths = [2, 4, 6] if quick else [2, 3, 4, 5, 6]
    draws_a = [10, 40, 160] if quick else [10, 40, 160, 640]
    seeds_b = 2 if quick else 4
    records = []

    def rec(r):
        r.update(inputs=src, n=n)
        records.append(r)
        append_jsonl(recs_path, r)

    t0 = time.time()
    # (a) Monte-Carlo mean of K^v against d sigma^(2(d-1)) H, width 32, depth 4
    w, d = 32, 4
    relu = _trained_relu(w, d, env.data_root, seed=0)
    env.log(f"(a) Monte-Carlo mean of K^v, width {w}, depth {d}, up to {draws_a[-1]} draws per regime and init")
    for regime, gates_from in (("frnpf-ii", None), ("flnpf", relu)):
        net = _gated_net(w, d, seed=100, gates_from=gates_from).to(env.device)
        H = npk(net, x)
        for init in ("bernoulli", "gaussian"):
            acc, done = torch.zeros_like(H), 0
            for target in tqdm(draws_a, desc=f"(a) {regime} {init}", disable=not env.progress, leave=False):
                while done < target:
                    sigma = _draw_value(net, w, init, seed=done)
                    acc += ntk(net, x, params="value")
                    done += 1
                mean = acc / done
                rec(
                    {
                        "part": "a",
                        "regime": regime,
                        "init": init,
                        "width": w,
                        "depth": d,
                        "draws": done,
                        "rel_err": rel_err(mean / (d * sigma ** (2 * (d - 1))), H),
                    }
                )
    # (b) one draw, widths x depths, FRNPF-II and FLNPF; (c) ReLU and DLNPF
    grid = [(dd, ww) for dd in depths for ww in widths]
    for i, (dd, ww) in enumerate(tqdm(grid, desc="(b, c) width x depth", disable=not env.progress, leave=False)):
        if not env.progress:
            env.log(f"(b, c) one draw per regime: depth {dd}, width {ww} ({i + 1} of {len(grid)})")
        relu = _trained_relu(ww, dd, env.data_root, seed=dd * 1000 + ww)
        for s in range(seeds_b):
            for regime in ("frnpf-ii", "flnpf"):
                net = _gated_net(ww, dd, seed=s, gates_from=relu if regime == "flnpf" else None).to(env.device)
                sigma = _draw_value(net, ww, "bernoulli", seed=10_000 + s)
                H = npk(net, x)
                Kv = ntk(net, x, params="value")
                rec(
                    {
                        "part": "b",
                        "regime": regime,
                        "init": "bernoulli",
                        "width": ww,
                        "depth": dd,
                        "seed": s,
                        "rel_err": rel_err(Kv / (dd * sigma ** (2 * (dd - 1))), H),
                    }
                )
            # (d) the NPK of random Gaussian gates (variance 2 / fan-in, no biases) against its infinite-width
            # limit H / w^(d-1) -> npk_infinite (docs/THEORY.md §8): one draw per seed, same rate expected
            rg = _gated_net(ww, dd, seed=60_000 + s)
            xd = x.cpu().double().flatten(1)
            rec(
                {
                    "part": "d",
                    "regime": "random gates vs infinite width",
                    "init": "gaussian",
                    "width": ww,
                    "depth": dd,
                    "seed": s,
                    "rel_err": rel_err(npk(rg, xd) / ww ** (dd - 1), npk_infinite(xd, depth=dd)),
                }
            )
            # (c) the standard ReLU net: its gates come from the very weights being differentiated
            tied = FCDGN(in_dim=784, width=ww, depth=dd, out_dim=1, bias=False, tied=True).double().to(env.device)
            sigma = _draw_value(tied, ww, "bernoulli", seed=20_000 + s)
            rec(
                {
                    "part": "c",
                    "regime": "relu",
                    "init": "bernoulli",
                    "width": ww,
                    "depth": dd,
                    "seed": s,
                    "rel_err": rel_err(ntk(tied, x, params="all") / (dd * sigma ** (2 * (dd - 1))), npk(tied, x)),
                }
            )
            # (c) DLNPF: soft gates from an independent feature net; K = K^v + K^f
            dl = seeded_fc(ww, dd, 1, 30_000 + s, bias=False, gate="soft", init="gaussian").double().to(env.device)
            sigma = _draw_value(dl, ww, "bernoulli", seed=40_000 + s)
            init_layers(dl.feature_layers.cpu(), "bernoulli", C, torch.Generator().manual_seed(50_000 + s))
            dl.to(env.device)
            H = npk(dl, x)
            for params in ("value", "all"):
                rec(
                    {
                        "part": "c",
                        "regime": f"dlnpf ({'K^v' if params == 'value' else 'K^v + K^f'})",
                        "init": "bernoulli",
                        "width": ww,
                        "depth": dd,
                        "seed": s,
                        "rel_err": rel_err(ntk(dl, x, params=params) / (dd * sigma ** (2 * (dd - 1))), H),
                    }
                )
    summary = summarize(records)
    summary["seconds"] = time.time() - t0
    write_text(out / "theorem.md", report(summary, quick))
    plot(records, out / "theorem.png")
    return summary


def summarize(records):
    slopes = {}
    for regime in sorted({r["regime"] for r in records if r["part"] in "bcd"}):
        for d in sorted({r["depth"] for r in records if r["part"] in "bcd"}):
            pts = [
                (r["width"], r["rel_err"])
                for r in records
                if r["part"] in "bcd" and r["regime"] == regime and r["depth"] == d
            ]
            ws = sorted({p[0] for p in pts})
            errs = [np.mean([e for w, e in pts if w == ww]) for ww in ws]
            slope = float(np.polyfit(np.log(ws), np.log(errs), 1)[0])
            slopes[f"{regime}|{d}"] = {"slope": slope, "err_at_max_width": float(errs[-1]), "max_width": ws[-1]}
    a = [r for r in records if r["part"] == "a"]
    return {"slopes": slopes, "part_a": a}


def report(s, quick):
    lines = [
        "# Theorem 5.1 measured",
        "",
        f"budget: {'quick' if quick else 'full'}",
        "",
        "## (a) Monte-Carlo mean of K^v vs d sigma^(2(d-1)) H (width 32, depth 4)",
        "",
        "| regime | init | draws | rel. Frobenius error |",
        "|---|---|---|---|",
    ]
    for r in s["part_a"]:
        lines.append(f"| {r['regime']} | {r['init']} | {r['draws']} | {r['rel_err']:.4f} |")
    lines += [
        "",
        "## (b, c, d) one draw: error vs width, fitted log-log slope",
        "",
        "| regime | depth | slope | error at widest |",
        "|---|---|---|---|",
    ]
    for k, v in s["slopes"].items():
        reg, d = k.split("|")
        lines.append(f"| {reg} | {d} | {v['slope']:.3f} | {v['err_at_max_width']:.4f} (w={v['max_width']}) |")
    return "\n".join(lines) + "\n"


def plot(records, path):
    from .common import pyplot

    plt = pyplot()

    from ..io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    a = [r for r in records if r["part"] == "a"]
    for key in sorted({(r["regime"], r["init"]) for r in a}):
        pts = [(r["draws"], r["rel_err"]) for r in a if (r["regime"], r["init"]) == key]
        axes[0].loglog(*zip(*pts), "o-", label=f"{key[0]}, {key[1]}")
    axes[0].set(
        xlabel="Monte-Carlo draws",
        ylabel="rel. error of E[K^v]/(d σ^{2(d-1)}) vs H",
        title="(a) expectation is exact: error ~ draws^(-1/2)",
    )
    axes[0].legend(fontsize=8)
    bc = [r for r in records if r["part"] in "bcd"]
    depths = sorted({r["depth"] for r in bc})
    styles = {
        "frnpf-ii": "-",
        "flnpf": "--",
        "relu": ":",
        "dlnpf (K^v)": "-.",
        "dlnpf (K^v + K^f)": (0, (1, 3)),
        "random gates vs infinite width": (0, (5, 1)),
    }
    cmap = plt.get_cmap("viridis")
    for regime, ls in styles.items():
        for i, d in enumerate(depths):
            pts = [(r["width"], r["rel_err"]) for r in bc if r["regime"] == regime and r["depth"] == d]
            if not pts:
                continue
            ws = sorted({p[0] for p in pts})
            errs = [np.mean([e for w, e in pts if w == ww]) for ww in ws]
            axes[1].loglog(
                ws,
                errs,
                linestyle=ls,
                color=cmap(i / max(1, len(depths) - 1)),
                label=f"{regime}, d={d}" if i in (0, len(depths) - 1) else None,
            )
    axes[1].set(xlabel="width w", ylabel="||K/(d σ^{2(d-1)}) - H||_F / ||H||_F", title="(b, c) one draw vs width")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
