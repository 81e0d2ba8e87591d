"""Benchmarks: ratios against a baseline measured in the same run, medians of repeats, peak memory.

    python -m benchmarks npk      NPK (FC 6x128, n=4000) vs one dense GEMM with the same multiply-adds
    python -m benchmarks ntk      structured NTK vs torch.func Jacobian contraction and NTK-vector products (n=512)
    python -m benchmarks step     frozen-gate DGN (FLNPF/FRNPF) optimiser step vs ReLU step, FC 6x128, batch 32
    python -m benchmarks stream   the full 60,000 x 60,000 MNIST NPK streamed to a memmap (long: ~minutes)
    python -m benchmarks convnpk  pairs per second of the full-size GCONV NPK
    python -m benchmarks ensemble one table row (5 regimes x 5 seeds, FC 6x128, batch 32): run by run vs the vectorised
                                  ensemble, per step, extrapolated to the paper's 100 epochs (Adam) or 300 (SGD)
    python -m benchmarks ntk10k   the value-network NTK of 10,000 MNIST images (FC 6x128, 10 logits), streamed
    python -m benchmarks peer     structured NTK vs torch.func vs neural-tangents 0.6.5 (optional environment)
    python -m benchmarks data     share of a training epoch spent getting batches (indexing the in-memory tensors)
    python -m benchmarks npkscale NPK vs GEMM while n (1k-8k), width (64-512), depth (2-8) and hard/soft gates vary
    python -m benchmarks convntk  structured NTK of a small GCONV vs torch.func Jacobian contraction
    python -m benchmarks convntkfull  structured NTK of the full-width GCONV on 1,000 CIFAR-10 images
    python -m benchmarks roofline lower bound on the fc-adam row from this machine's measured GEMM rate and memory
                                  bandwidth, beside the measured ensemble steps
    python -m benchmarks convstep conv optimiser steps per regime kind and width, single and stacked, vs the GEMM rate
    python -m benchmarks convratio frozen/ReLU and DLNPF/ReLU step ratios of one full-width conv net, interleaved rounds
    python -m benchmarks npkload  FC NPK vs GEMM with the second core quiet, then busy with elementwise work
    python -m benchmarks convnpk_scale  GCONV NPK pairs/s at n = 1,000 vs its overlap GEMMs at the GEMM rate
    python -m benchmarks resnetnpk NPK of 1,000 inputs through a ResNet-18-sized CIFAR ResNet, vs its overlaps
    python -m benchmarks thpstep  GCONV optimiser steps under the process's THP_MEM_ALLOC_ENABLE (run it with 0 and 1)
    python -m benchmarks dlnpfvariants  DLNPF step: eager vs grouped feature+value convs vs torch.compile, vs ReLU
    python -m benchmarks fcbackward  the fc-adam row's ensemble steps: autograd's backward vs a hand-written one
Each prints a JSON line; docs/PERFORMANCE.md records the figures.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

import neuralpath as npx

# As the CLI does (neuralpath.cli.main): large tensors on transparent huge pages; THP_MEM_ALLOC_ENABLE=0 to compare.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
from neuralpath.regimes import build_regime
from neuralpath.train import make_optimizer


def timeit(fn, repeat=5, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mnist(n, split="train"):
    try:
        x, _ = npx.datasets.load("mnist", split, limit=n)
    except (FileNotFoundError, ValueError):
        x, _ = npx.datasets.load("synthetic", split, n=n, shape=(1, 28, 28))
    return x


def bench_npk(args):
    n = args.n or 4000
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    k = 784 + 5 * 128
    a, b = torch.randn(n, k), torch.randn(n, k)
    t_gemm = timeit(lambda: a @ b.T, args.repeat)
    t_npk = timeit(lambda: npx.npk(net, x, block=n), args.repeat)
    t_npk_blocked = timeit(lambda: npx.npk(net, x, block=1024), args.repeat)
    return dict(
        bench="npk",
        n=n,
        gemm_s=t_gemm,
        npk_s=t_npk,
        npk_blocked1024_s=t_npk_blocked,
        ratio=t_npk / t_gemm,
        ratio_blocked=t_npk_blocked / t_gemm,
    )


def bench_ntk(args):
    n = args.n or 512
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    t_s = timeit(lambda: npx.ntk(net, x, params="all"), args.repeat)
    t_j = timeit(lambda: npx.ntk(net, x, params="all", method="jacobian"), max(1, args.repeat // 2), warmup=0)
    small = x[:128]
    t_s_small = timeit(lambda: npx.ntk(net, small, params="all"), args.repeat)
    t_vp = timeit(lambda: npx.ntk(net, small, params="all", method="vp"), 1, warmup=0)
    return dict(
        bench="ntk",
        n=n,
        structured_s=t_s,
        jacobian_s=t_j,
        speedup_vs_jacobian=t_j / t_s,
        n_vp=128,
        structured_small_s=t_s_small,
        vp_s=t_vp,
        speedup_vs_vp=t_vp / t_s_small,
    )


def bench_step(args):
    x, y = mnist(32 * 50), torch.randint(0, 10, (32 * 50,))
    out = {}
    for regime in ("relu", "frnpf-ii", "dlnpf"):
        net, params = build_regime(regime, "fc", 0, in_shape=(1, 28, 28))
        opt = torch.optim.Adam(params, lr=1e-4, eps=1e-7)

        def epoch():
            for i in range(0, len(y), 32):
                loss = torch.nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        out[regime] = timeit(epoch, args.repeat) / 50
    return dict(
        bench="step",
        batch=32,
        step_s=out,
        frozen_over_relu=out["frnpf-ii"] / out["relu"],
        dlnpf_over_relu=out["dlnpf"] / out["relu"],
    )


def bench_stream(args):
    n = args.n or 60000
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    out = args.out or "/tmp/neuralpath-npk60k.npy"
    t = time.perf_counter()
    npx.npk(net, x, out=out, block=4096, progress=True)
    return dict(bench="stream", n=n, seconds=time.perf_counter() - t, peak_rss_gib=peak_rss_gib(), out=out)


_LOAD = r"""
import torch, sys
torch.set_num_threads(1)
a = torch.rand(1 << 22)
while True:  # elementwise work on one core: what 'the second core busy' means in docs/PERFORMANCE.md
    a.mul_(1.0000001).add_(1e-9)
"""


def bench_npkload(args):
    """The FC NPK (n = 4,000, 6x128, tiles of 1,024) against the same-multiply-add GEMM, interleaved (GEMM, NPK,
    NPK with ``NEURALPATH_THREADS=fixed``, ...), with the second core quiet and then busy with elementwise work (a
    background process). ``npk_s`` is the library's default (tiles on fewer threads while other processes keep cores
    busy, kernels/gram.py ``CoreShare``); ``fixed_s`` keeps torch's thread count, as before session 15."""
    import subprocess

    from neuralpath.kernels import gram

    n = args.n or 4000
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    k = 784 + 5 * 128
    a, b = torch.randn(n, k), torch.randn(n, k)

    def npk_with(mode):
        os.environ["NEURALPATH_THREADS"] = mode
        try:
            return npx.npk(net, x, block=1024)
        finally:
            os.environ.pop("NEURALPATH_THREADS")

    if not torch.equal(npk_with("auto"), npk_with("fixed")):
        raise SystemExit("npkload: the kernel differs between adaptive and fixed thread counts")
    out = {}
    for mode in ("quiet", "loaded"):
        proc = subprocess.Popen([sys.executable, "-c", _LOAD]) if mode == "loaded" else None
        try:
            time.sleep(1.0 if proc else 0.0)
            g, p, f, seen = [], [], [], []
            a @ b.T
            npk_with("auto")
            for _ in range(args.repeat):
                g.append(timeit(lambda: a @ b.T, 1, warmup=0))
                p.append(timeit(lambda: npk_with("auto"), 1, warmup=0))
                seen.append(round(gram._CORES.others, 2))
                f.append(timeit(lambda: npk_with("fixed"), 1, warmup=0))
        finally:
            if proc:
                proc.kill()
                proc.wait()
        gm = statistics.median(g)
        out[mode] = dict(
            gemm_s=gm,
            npk_s=statistics.median(p),
            ratio=statistics.median(p) / gm,
            fixed_s=statistics.median(f),
            fixed_ratio=statistics.median(f) / gm,
            others_cores=seen,  # the cores other processes kept busy, as the engine measured them after each call
        )
    return dict(bench="npkload", n=n, **out)


def _gemm_rate():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    return 2 * 2048**3 / min(timeit(lambda: a @ b, 1, warmup=0) for _ in range(5)) / 1e9


def bench_convnpk_scale(args):
    """Pairs per second of the GCONV NPK (float32) at n = 1,000 (``--n``), at the paper's width and at x1/4,
    against the multiply-adds of its per-position overlap GEMMs (n^2/2 pairs x HW x sum_l C_l x 2, plus the input's
    HW x 3) at the large-GEMM rate measured in the same run; ``work_bound_s`` adds the forward pass that makes the
    gates (torch's FLOP counter, once per input), which the closed form cannot skip."""
    from torch.utils.flop_counter import FlopCounterMode

    from neuralpath.experiments.budget import conv_widths

    n = args.n or 1000
    rate = _gemm_rate()
    x = torch.rand(n, 3, 32, 32)
    rows = []
    for mult in (1.0, 0.25):
        ch, hid = conv_widths(mult)
        net = npx.ConvDGN("gconv", channels=ch, hidden=hid, tied=True)
        from neuralpath.kernels.npk import featurize

        # a first small kernel compiles the fused tile passes (kernels/fused.py), so the timing below excludes it
        t_warm = timeit(lambda: npx.npk(net, x[:64]), 1, warmup=0)
        t = timeit(lambda: npx.npk(net, x), 1, warmup=0)
        # the features the NPK itself makes (bit-packed hard gates), timed and dropped block by block
        t_feat = timeit(lambda: [len(featurize(net, x[i : i + 256], compact=True)) for i in range(0, n, 256)], 1, 0)
        pairs = n * (n + 1) / 2
        flops = pairs * 2 * 1024 * (3 + sum(ch))
        bound = flops / rate / 1e9
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net.gates(x[:8])
        forward = fc.get_total_flops() / 8
        work = (flops + n * forward) / rate / 1e9
        rows.append(
            dict(
                width=mult,
                seconds=t,
                warmup_s=t_warm,  # 64 inputs, the first call: the compile of the fused passes (cached on disk after)
                fused=os.environ.get("NEURALPATH_FUSED", "auto"),
                featurize_s=t_feat,  # the model's forward pass and the position-major copies, once per input
                pairs_per_s=pairs / t,
                gemm_bound_s=bound,
                over_bound=t / bound,
                tiles_over_bound=(t - t_feat) / bound,  # the tile loop alone (what grows as n^2)
                forward_gflop_per_input=forward / 1e9,
                work_bound_s=work,
                over_work_bound=t / work,
            )
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return dict(bench="convnpk_scale", n=n, large_gemm_gflops=rate, rows=rows)


def bench_resnetnpk(args):
    """NPK (cosine-normalised, float32) of n = 1,000 CIFAR-shaped inputs (``--n``) through a ResNet-18-sized CIFAR
    ResNet (blocks 2, 2, 2, 2; widths 64-512; no batch norm), against two bounds at the large-GEMM rate of the same
    run, and the peak memory of the process.

    - ``overlap_gemm_bound_s``: the multiply-adds of its gate overlaps, every ReLU's units once per pair (n(n+1)/2
      pairs x 2 x units): the any-network issue's bound.
    - ``work_bound_s``: the FLOPs the closed form cannot avoid, counted by torch's FLOP counter: the model's forward
      pass once per input (the gates) plus the overlap GEMMs of one pair (every factored term of a residual sum is
      one GEMM over a product of gates: the NPK of a ResNet sums over the sub-networks that keep or skip each block),
      for the same n(n+1)/2 pairs. At n = 1,000 the forward pass alone is 2.0x the first bound's FLOPs, so no
      implementation can be within 2x of it there (docs/PERFORMANCE.md)."""
    from torch.utils.flop_counter import FlopCounterMode

    from neuralpath.anynet import from_module
    from neuralpath.anynet.npk import featurize, propagate
    from neuralpath.regimes import make_resnet

    n = args.n or 1000
    rate = _gemm_rate()
    model = make_resnet(0, blocks=(2, 2, 2, 2), width=64).eval()
    m = from_module(model, torch.zeros(2, 3, 32, 32))
    x = torch.rand(n, 3, 32, 32)
    units = sum(g[0].numel() for g in m.gates(x[:1]))
    with FlopCounterMode(display=False) as fc_f:
        f = featurize(m, x[:8])
    with FlopCounterMode(display=False) as fc_p:
        propagate(m, f, f)
    forward_flops = fc_f.get_total_flops() / 8
    pair_flops = fc_p.get_total_flops() / 64
    t = timeit(lambda: npx.npk(m, x, normalize="cosine"), 1, warmup=0)
    pairs = n * (n + 1) / 2
    bound = pairs * 2 * units / rate / 1e9
    work = (n * forward_flops + pairs * pair_flops) / rate / 1e9
    return dict(
        bench="resnetnpk",
        n=n,
        gated_units=units,
        seconds=t,
        pairs_per_s=pairs / t,
        large_gemm_gflops=rate,
        overlap_gemm_bound_s=bound,
        over_bound=t / bound,
        forward_gflop_per_input=forward_flops / 1e9,
        overlap_mflop_per_pair=pair_flops / 1e6,
        work_bound_s=work,
        over_work_bound=t / work,
        peak_rss_gib=peak_rss_gib(),
        thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"),
    )


def bench_convnpk(args):
    n = args.n or 64
    net = npx.ConvDGN("gconv", in_channels=3, out_dim=10, tied=True)
    x = torch.rand(n, 3, 32, 32)
    t = timeit(lambda: npx.npk(net, x, block=32), max(1, args.repeat // 2))
    return dict(bench="convnpk", n=n, seconds=t, pairs_per_s=n * (n + 1) / 2 / t)


def _make_nets(regs, seeds):
    relu_state = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))[0].state_dict()
    return [
        build_regime(r, "fc", s, relu_state if r == "flnpf" else None, in_shape=(1, 28, 28))[0]
        for r, s in zip(regs, seeds)
    ]


def _opt_for(params, opt_name):
    return (
        torch.optim.Adam(params, lr=1e-4, eps=1e-7, fused=True)
        if opt_name == "adam"
        else torch.optim.SGD(params, lr=1e-2)
    )


def _row_phases(n_seeds=5):
    """The two ensembles of one FC table row, as train_ensemble builds them: (regimes, seeds) per phase."""
    seeds = list(range(n_seeds))
    p1 = [r for r in ("relu", "frnpf-ii", "frnpf-di", "dlnpf") for _ in seeds]
    return [(p1, seeds * 4), (["flnpf"] * n_seeds, seeds)]


def _ensemble_step_time(regs, seeds, x, y, steps, opt_name, repeat, batch=32):
    import torch.nn.functional as F

    from neuralpath.stacks import FCStack

    ens = FCStack(_make_nets(regs, seeds))
    opt = _opt_for(ens.parameters(), opt_name)
    R = ens.R
    ens.cache_frozen_gates(x, None)

    def step():
        idx = torch.randint(0, len(x), (R, batch))
        flat = idx.reshape(-1)
        xb, yb = x.index_select(0, flat).view(R, batch, -1), y.index_select(0, flat).view(R, batch)
        out = ens.forward(xb, idx)
        loss = F.cross_entropy(out.reshape(R * batch, -1), yb.reshape(-1), reduction="sum") / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timeit(lambda: [step() for _ in range(steps)], repeat) / steps, ens


def bench_ensemble(args):
    import torch.nn.functional as F

    x = mnist(60000).flatten(1)
    y = torch.randint(0, 10, (60000,))
    steps = args.n or 150
    opt_name = args.optimizer

    def single_step_time(regime):
        net, params = build_regime(
            regime,
            "fc",
            0,
            build_regime("relu", "fc", 0, in_shape=(1, 28, 28))[0].state_dict() if regime == "flnpf" else None,
            in_shape=(1, 28, 28),
        )
        opt = torch.optim.Adam(params, lr=1e-4, eps=1e-7) if opt_name == "adam" else torch.optim.SGD(params, lr=1e-2)

        def step():
            idx = torch.randint(0, 60000, (32,))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return timeit(lambda: [step() for _ in range(steps)], args.repeat) / steps

    (p1, s1), (p2, s2) = _row_phases()
    t1, _ = _ensemble_step_time(p1, s1, x, y, steps, opt_name, args.repeat)
    t2, _ = _ensemble_step_time(p2, s2, x, y, steps, opt_name, args.repeat)
    single = {r: single_step_time(r) for r in ("relu", "frnpf-ii", "frnpf-di", "dlnpf", "flnpf")}
    epochs = 100 if opt_name == "adam" else 300
    steps_row = 1875 * epochs
    row_single = 5 * sum(single.values()) * steps_row
    row_ens = (t1 + t2) * steps_row
    return dict(
        bench="ensemble",
        optimizer=opt_name,
        ensemble_phase1_step_s=t1,
        ensemble_phase2_step_s=t2,
        single_step_s=single,
        row_one_at_a_time_min=row_single / 60,
        row_ensemble_min=row_ens / 60,
        speedup=row_single / row_ens,
        note="training steps only; evaluation adds ~1 test pass per run-epoch",
    )


def _step_work(ens, batch=32):
    """Matrix-product FLOPs and Adam bytes of one training step of an FCEnsemble, counted from its shapes: per
    stacked layer (R, in, out) forward 2*R*B*in*out, weight gradient the same, input gradient the same except for
    the first layer (the data needs none); fused Adam reads parameter, gradient and both moments and writes
    parameter and both moments: 7 float32 per parameter."""
    flops = 0
    for group in (ens.value, ens.soft):
        for l, (w, _) in enumerate(group):
            r, i, o = w.shape
            flops += 2 * r * batch * i * o * (2 if l == 0 else 3)
    params = sum(t.numel() for t in ens.parameters())
    return flops, params, 7 * 4 * params


def _step_gemms_s(ens, repeat, batch=32):
    """Seconds of the matrix products of one FCEnsemble step alone, at their own shapes and layouts (what autograd
    calls: forward ``baddbmm``, weight gradient ``x^T @ g``, input gradient ``g @ W^T`` for every layer but the
    first), on random tensors: the step's GEMMs at the rate this BLAS reaches on them (batch-32 products run below
    the large-GEMM rate), i.e. a bound that no change outside the products can beat."""
    calls = []
    for group in (ens.value, ens.soft):
        for l, (w, _) in enumerate(group):
            r, i, o = w.shape
            x, g, b = torch.randn(r, batch, i), torch.randn(r, batch, o), torch.randn(r, 1, o)
            wt = torch.randn(r, i, o)
            calls.append(lambda b=b, x=x, wt=wt: torch.baddbmm(b, x, wt))
            calls.append(lambda x=x, g=g: torch.bmm(x.transpose(1, 2), g))
            if l > 0:
                calls.append(lambda g=g, wt=wt: torch.bmm(g, wt.transpose(1, 2)))

    def gemms():
        for c in calls:
            c()

    return min(timeit(gemms, 20, warmup=2) for _ in range(max(repeat, 5)))


def _manual_fc_step(ens, x, y, idx, batch=32):
    """One training step of an FCStack with a hand-written backward (#18 item 4's idea: no autograd graph, the
    gates known): the same products as autograd's (forward ``baddbmm``, weight gradient ``h^T @ d``, input gradient
    ``d @ W^T``), the softmax cross-entropy gradient (softmax - onehot) / batch, the soft gates' derivative
    (1 + eps) beta s (1 - s) and the feature network's ReLU backward written out. Leaves the gradients in ``.grad``."""
    R, nt, nf, ns = ens.R, ens.nt, ens.nf, ens.ns
    flat = idx.reshape(-1)
    xs = x.index_select(0, flat).view(R, batch, -1)[ens.order]
    yb = y.index_select(0, flat).view(R, batch)[ens.order]
    with torch.no_grad():
        if nf:
            fg = ens._table[torch.arange(nf)[:, None], idx[ens.order][nt : nt + nf]]
        hs, pvs, gs, qs, sg = [xs], [], [], [], []
        h, fs = xs, (xs[nt + nf :] if ns else None)
        for l in range(ens.depth - 1):
            w, b = ens.value[l]
            pv = torch.baddbmm(b[:, None, :], h, w)
            parts = []
            if nt:
                parts.append((pv[:nt] > 0).to(pv.dtype))
            if nf:
                parts.append(fg[:, :, l].to(pv.dtype))
            if ns:
                wf, bf = ens.soft[l]
                q = torch.baddbmm(bf[:, None, :], fs, wf)
                s = torch.sigmoid(ens.beta * q)
                parts.append((1.0 + ens.eps) * s)
                qs.append(q)
                sg.append(s)
                fs = torch.relu(q)
            g = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            h = pv * g
            pvs.append(pv)
            gs.append(g)
            hs.append(h)
        w, b = ens.value[-1]
        d = torch.softmax(torch.baddbmm(b[:, None, :], h, w), -1)
        d.view(R * batch, -1)[torch.arange(R * batch), yb.reshape(-1)] -= 1.0
        d.div_(batch)
        w.grad, b.grad = torch.bmm(hs[-1].transpose(1, 2), d), d.sum(1)
        dh = torch.bmm(d, w.transpose(1, 2))
        dq_next = None
        for l in range(ens.depth - 2, -1, -1):
            w, b = ens.value[l]
            dpv = dh * gs[l]
            if ns:
                s = sg[l]
                dq = dh[nt + nf :] * pvs[l][nt + nf :] * ((1.0 + ens.eps) * ens.beta) * s * (1 - s)
                if dq_next is not None:
                    dq += torch.bmm(dq_next, ens.soft[l + 1][0].transpose(1, 2)) * (qs[l] > 0)
                wf, bf = ens.soft[l]
                fin = xs[nt + nf :] if l == 0 else torch.relu(qs[l - 1])
                wf.grad, bf.grad = torch.bmm(fin.transpose(1, 2), dq), dq.sum(1)
                dq_next = dq
            w.grad, b.grad = torch.bmm(hs[l].transpose(1, 2), dpv), dpv.sum(1)
            if l:
                dh = torch.bmm(dpv, w.transpose(1, 2))


def bench_fcbackward(args):
    """#18 item 4's idea, measured: the fc-adam row's two ensemble steps (FCStack, fused Adam, batch 32) with
    autograd's backward and with the hand-written one of ``_manual_fc_step``, in interleaved rounds of ``--n`` steps
    on the same batches (``--repeat`` rounds after one warm-up round); first the two gradients of one batch compared."""
    import torch.nn.functional as F

    from neuralpath.stacks import FCStack

    x = mnist(60000).flatten(1)
    y = torch.randint(0, 10, (60000,), generator=torch.Generator().manual_seed(0))
    steps, batch = args.n or 100, 32
    gen = torch.Generator().manual_seed(1)
    phases = []
    for regs, seeds in _row_phases():
        stacks = []
        for _ in range(2):
            ens = FCStack(_make_nets(regs, seeds))
            ens.cache_frozen_gates(x, None)
            stacks.append((ens, _opt_for(ens.parameters(), "adam")))
        (ea, oa), (em, om) = stacks

        def auto(idx, ens=ea, opt=oa):
            R, flat = ens.R, idx.reshape(-1)
            xb, yb = x.index_select(0, flat).view(R, batch, -1), y.index_select(0, flat).view(R, batch)
            out = ens.forward(xb, idx)
            loss = F.cross_entropy(out.reshape(R * batch, -1), yb.reshape(-1), reduction="sum") / batch
            opt.zero_grad(set_to_none=True)
            loss.backward()

        def manual(idx, ens=em, opt=om):
            opt.zero_grad(set_to_none=True)
            _manual_fc_step(ens, x, y, idx, batch)

        idx = torch.randint(0, len(x), (ea.R, batch), generator=gen)
        auto(idx)
        manual(idx)
        rel = max(
            ((a.grad - m.grad).abs().max() / a.grad.abs().max()).item()
            for a, m in zip(ea.parameters(), em.parameters())
        )
        rounds = []
        for r in range(args.repeat + 1):
            batches = [torch.randint(0, len(x), (ea.R, batch), generator=gen) for _ in range(steps)]
            t = {}
            for name, fn, opt in (("autograd", auto, oa), ("manual", manual, om)):
                t0 = time.perf_counter()
                for i in batches:
                    fn(i)
                    opt.step()
                t[name] = (time.perf_counter() - t0) / steps
            if r:
                rounds.append(t)
        med = {k: statistics.median(t[k] for t in rounds) for k in ("autograd", "manual")}
        phases.append(
            dict(
                runs=len(regs),
                max_rel_grad_diff=rel,
                autograd_step_s=med["autograd"],
                manual_step_s=med["manual"],
                speedup=med["autograd"] / med["manual"],
                rounds_speedup=[t["autograd"] / t["manual"] for t in rounds],
            )
        )
        print(json.dumps(phases[-1]), file=sys.stderr, flush=True)
    return dict(bench="fcbackward", steps_per_round=steps, phases=phases)


def bench_roofline(args):
    """Lower bound on the fc-adam row at the paper's budget on this machine, from its measured peaks: the row's GEMM
    FLOPs at the rate of one large GEMM plus the Adam traffic at the measured memory bandwidth, beside the measured
    ensemble steps (same run)."""
    x = mnist(60000).flatten(1)
    y = torch.randint(0, 10, (60000,))
    steps = args.n or 100

    def fastest(fn):  # a bound wants the best rate seen, not the median
        return min(timeit(fn, 1, warmup=0) for _ in range(max(args.repeat, 5)))

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    gemm_gflops = 2 * 2048**3 / fastest(lambda: a @ b) / 1e9
    big = 1 << 26  # 256 MiB per float32 array
    arrays = [torch.empty(big), torch.rand(big), torch.rand(big)]
    triad_gbs = 3 * 4 * big / fastest(lambda: torch.add(arrays[1], arrays[2], alpha=0.5, out=arrays[0])) / 1e9
    arrays.clear()  # free the 768 MiB
    steps_row = 1875 * 100
    phases = []
    for regs, seeds in _row_phases():
        t, ens = _ensemble_step_time(regs, seeds, x, y, steps, "adam", args.repeat)
        flops, params, adam_bytes = _step_work(ens)
        flat = torch.zeros(params, requires_grad=True)
        flat.grad = torch.rand(params)
        adam = torch.optim.Adam([flat], lr=1e-4, eps=1e-7, fused=True)  # the same update on one flat tensor
        adam.step()
        t_adam = fastest(adam.step)
        adam_gbs = adam_bytes / t_adam / 1e9  # fused Adam alone can stream faster than the triad: take the faster
        bound = flops / (gemm_gflops * 1e9) + adam_bytes / (max(triad_gbs, adam_gbs) * 1e9)
        t_gemms = _step_gemms_s(ens, args.repeat)
        phases.append(
            dict(
                runs=len(regs),
                gemm_mflop_per_step=flops / 1e6,
                adam_params=params,
                adam_mb_per_step=adam_bytes / 1e6,
                measured_step_s=t,
                fused_adam_alone_s=t_adam,
                fused_adam_alone_gb_per_s=adam_gbs,
                lower_bound_step_s=bound,
                measured_over_bound=t / bound,
                gemms_at_their_shapes_s=t_gemms,
                gemms_at_their_shapes_gflops=flops / t_gemms / 1e9,
                shape_bound_step_s=t_gemms + t_adam,
                measured_over_shape_bound=t / (t_gemms + t_adam),
            )
        )
    # The alternative layout for the first layer: the five networks of one seed (ReLU, FRNPF-II, FRNPF-DI, DLNPF value
    # and feature) share its batch, so per seed one (32 x 784) x (784 x 640) product instead of the batched (32 x 784)
    # x (784 x 128) per network. GFLOP/s of the forward and of the weight gradient, both layouts, 5 seeds.
    first = {}
    for name, r, o in (("batched_per_network", 25, 128), ("merged_per_seed", 5, 640)):
        xb, wb, gb = torch.randn(r, 32, 784), torch.randn(r, 784, o), torch.randn(r, 32, o)
        fl = 2 * r * 32 * 784 * o
        first[name] = {
            "forward_gflops": fl / timeit(lambda: torch.bmm(xb, wb), args.repeat * 20) / 1e9,
            "weight_grad_gflops": fl / timeit(lambda: torch.bmm(xb.transpose(1, 2), gb), args.repeat * 20) / 1e9,
        }
    return dict(
        bench="roofline",
        large_gemm_gflops=gemm_gflops,
        triad_gb_per_s=triad_gbs,
        steps_in_row=steps_row,
        phases=phases,
        first_layer_layouts=first,
        row_lower_bound_min=sum(p["lower_bound_step_s"] for p in phases) * steps_row / 60,
        row_measured_min=sum(p["measured_step_s"] for p in phases) * steps_row / 60,
        note="training steps only; the bound ignores activations, elementwise work and evaluation",
    )


def _conv_fwd_flops(arch, channels, hidden, image=32, k=3, classes=10):
    """Forward multiply-add FLOPs per image of each layer of a GCONV/VCONV value network (2 FLOP per MAC)."""
    fl, cin = [], 3
    for c in channels:
        fl.append(2 * image * image * k * k * cin * c)
        cin = c
    d = cin * image * image if arch == "vconv" else cin
    for h in list(hidden) + [classes]:
        fl.append(2 * d * h)
        d = h
    return fl


def _conv_step_flops(arch, channels, hidden, regime, batch=32):
    """Matrix-product FLOPs of one training step, from the shapes: forward, weight gradient and input gradient of
    every trained layer (no input gradient into the data); DLNPF adds its feature network (no output layer), trained
    the same way; a frozen-gate step with cached gates is the value network's step alone."""
    fl = _conv_fwd_flops(arch, channels, hidden)
    value = 3 * sum(fl) - fl[0]
    if regime == "dlnpf":
        feat = fl[:-1]
        value += 3 * sum(feat) - feat[0]
    return value * batch


def _grouped_relu_step(arch, channels, hidden, R, batch=32):
    """R tied ReLU nets stacked as ONE network with grouped convolutions (groups = R) and batched dense layers: the
    alternative stacking design, measured against the loop of separate networks."""
    import torch.nn.functional as F

    ws, cin = [], 3
    for c in channels:
        ws.append(torch.nn.Parameter(torch.randn(R * c, cin, 3, 3) * 0.05))
        ws.append(torch.nn.Parameter(torch.zeros(R * c)))
        cin = c
    d = cin * 32 * 32 if arch == "vconv" else cin
    dense = []
    for h in list(hidden) + [10]:
        dense.append(torch.nn.Parameter(torch.randn(R, d, h) * d**-0.5))
        dense.append(torch.nn.Parameter(torch.zeros(R, 1, h)))
        d = h
    opt = make_optimizer("adam", ws + dense, 1e-4)
    x = torch.rand(batch, R * 3, 32, 32)
    y = torch.randint(0, 10, (R, batch))

    def step():
        z = x
        for i in range(0, len(ws), 2):
            z = torch.relu(F.conv2d(z, ws[i], ws[i + 1], padding=1, groups=R))
        c = z.shape[1] // R
        z = z.view(batch, R, c, 32, 32)
        z = z.flatten(2).transpose(0, 1) if arch == "vconv" else z.mean((3, 4)).transpose(0, 1)  # (R, B, D)
        for i in range(0, len(dense), 2):
            z = torch.baddbmm(dense[i + 1], z, dense[i])
            if i < len(dense) - 2:
                z = torch.relu(z)
        loss = F.cross_entropy(z.reshape(-1, 10), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_convstep(args):
    """One optimiser step (Adam, batch 32) of GCONV and VCONV for each regime kind (tied ReLU, soft-gate DLNPF,
    frozen gates looked up from the bit-packed cache), at the paper's widths and x1/2, x1/4: single runs and stacks
    of R = 3 (the engine's loop), and the grouped-convolution stacking design; each against its matrix-product
    FLOPs at the large-GEMM rate measured in the same run."""

    from neuralpath.experiments.budget import conv_widths

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / min(timeit(lambda: a @ b, 1, warmup=1) for _ in range(5)) / 1e9
    steps, R = args.n or 4, 3
    x = torch.rand(512, 3, 32, 32)
    y = torch.randint(0, 10, (512,))
    out = []
    archs = [args.arch] if args.arch else ["gconv", "vconv"]
    for arch in archs:
        for mult in (1.0, 0.5, 0.25):
            ch, hid = conv_widths(mult)
            kw = dict(in_shape=(3, 32, 32), channels=ch, hidden=hid)
            rec = dict(arch=arch, width=mult, channels=ch, hidden=hid)
            for regime in ("relu", "frnpf-ii", "dlnpf"):
                for r in (1, R):
                    step = _stack_step(regime, arch, r, kw, x, y)
                    t = timeit(lambda: [step() for _ in range(steps)], args.repeat) / steps / r
                    fl = _conv_step_flops(arch, ch, hid, regime)
                    rec[f"{regime}_R{r}_step_s"] = t
                    rec[f"{regime}_R{r}_gflops"] = fl / t / 1e9
                    rec[f"{regime}_R{r}_of_gemm"] = fl / t / 1e9 / gemm
            rec["frozen_over_relu"] = rec["frnpf-ii_R1_step_s"] / rec["relu_R1_step_s"]
            rec["dlnpf_over_relu"] = rec["dlnpf_R1_step_s"] / rec["relu_R1_step_s"]
            g = _grouped_relu_step(arch, ch, hid, R)
            t = timeit(lambda: [g() for _ in range(steps)], args.repeat) / steps / R
            rec["relu_grouped_R3_step_s"] = t
            rec["relu_grouped_R3_gflops"] = _conv_step_flops(arch, ch, hid, "relu") / t / 1e9
            out.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    full = {r["arch"]: r["relu_R3_gflops"] for r in out if r["width"] == 1.0}
    for r in out:
        r["relu_R3_rate_vs_full_width"] = r["relu_R3_gflops"] / full[r["arch"]] if r["arch"] in full else None
    return dict(bench="convstep", large_gemm_gflops=gemm, steps=steps, stack=R, rows=out)


def bench_ntk10k(args):
    n = args.n or 10000
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    out = args.out or "/tmp/neuralpath-ntk10k.npy"
    t = time.perf_counter()
    npx.ntk(net, x, params="value", out=out, block=1024, progress=True)
    return dict(bench="ntk10k", n=n, seconds=time.perf_counter() - t, peak_rss_gib=peak_rss_gib(), out=out)


def _peer_python():
    import os
    from pathlib import Path

    cand = [
        os.environ.get("NEURALPATH_PEER_PYTHON"),
        str(Path(__file__).resolve().parents[1] / ".venv-peers/bin/python"),
    ]
    return next((c for c in cand if c and Path(c).exists()), None)


def bench_peer(args):
    import subprocess
    import tempfile

    import numpy as np

    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    ns = [64, 128, 256, 512, 1024] if not args.n else [args.n]
    x = mnist(max(ns)).flatten(1)
    recs = []
    for n in ns:
        xs = x[:n]
        t_s = timeit(lambda: npx.ntk(net, xs, params="all"), args.repeat)
        rec = {"impl": "neuralpath structured", "n": n, "seconds": t_s}
        recs.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if n <= 256:
            recs.append(
                {
                    "impl": "torch.func jacobian",
                    "n": n,
                    "seconds": timeit(lambda: npx.ntk(net, xs, params="all", method="jacobian"), 1),
                }
            )
        if n <= 128:
            recs.append(
                {
                    "impl": "torch.func ntk-vector products",
                    "n": n,
                    "seconds": timeit(lambda: npx.ntk(net, xs, params="all", method="vp"), 1, warmup=0),
                }
            )
    py = _peer_python()
    peer = {"skipped": "neural-tangents environment absent (bash scripts/peer-env.sh)"}
    if py:
        with tempfile.TemporaryDirectory() as d:
            z = {f"W{i}": l.weight.detach().numpy() for i, l in enumerate(net.value_layers)}
            z.update({f"b{i}": l.bias.detach().numpy() for i, l in enumerate(net.value_layers)})
            np.savez(f"{d}/in.npz", x=x.numpy(), ns=np.array(ns), **z)
            r = subprocess.run(
                [py, str(__import__("pathlib").Path(__file__).with_name("nt_peer.py")), f"{d}/in.npz", f"{d}/out.json"],
                stdout=subprocess.PIPE,
                stderr=None,
                text=True,
                timeout=3000,
            )
            if r.returncode != 0:
                peer = {"error": f"exit status {r.returncode} (see the output above)"}
            else:
                peer = json.loads(open(f"{d}/out.json").read())
                kn = peer.get("kernel_n")
                if kn:
                    k_nt = np.load(f"{d}/out.json.kernel.npy")
                    ref, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))  # the same weights (seed 0)
                    ours = npx.ntk(ref, x[:kn], params="all").numpy() / ref.out_dim  # neural-tangents averages
                    peer["max_rel_diff_vs_neuralpath"] = float(np.abs(k_nt - ours).max() / np.abs(ours).max())
    return dict(bench="peer", records=recs, neural_tangents=peer)


def bench_data(args):
    """Share of an FC epoch spent getting batches: time the indexing alone, and the full steps."""
    import torch.nn.functional as F

    x = mnist(60000).flatten(1)
    y = torch.randint(0, 10, (60000,))
    net, params = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    opt = torch.optim.Adam(params, lr=1e-4, eps=1e-7)
    order = torch.randperm(60000)
    steps = args.n or 600

    def fetch_only():
        for i in range(0, 32 * steps, 32):
            idx = order[i : i + 32]
            x[idx], y[idx]

    def full():
        for i in range(0, 32 * steps, 32):
            idx = order[i : i + 32]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    tf, tt = timeit(fetch_only, args.repeat), timeit(full, args.repeat)
    return dict(bench="data", steps=steps, fetch_s=tf, step_total_s=tt, data_share=tf / tt)


def bench_npkscale(args):
    """NPK time against the same-multiply-add GEMM while n, width, depth and the gate kind vary."""
    from neuralpath.nets import FCDGN

    recs = []
    x_all = mnist(8000).flatten(1)

    def one(n, width, depth, gate):
        net = FCDGN(in_dim=784, width=width, depth=depth, out_dim=10, gate=gate)
        x = x_all[:n]
        k = 784 + (depth - 1) * width
        a, b = torch.randn(n, k), torch.randn(n, k)
        tg = timeit(lambda: a @ b.T, args.repeat)
        tn = timeit(lambda: npx.npk(net, x, block=1024), args.repeat)
        recs.append(dict(n=n, width=width, depth=depth, gate=gate, npk_s=tn, gemm_s=tg, ratio=tn / tg))
        print(json.dumps(recs[-1]), file=sys.stderr, flush=True)

    for n in (1000, 2000, 4000, 8000):
        one(n, 128, 6, "hard")
    for w in (64, 256, 512):
        one(4000, w, 6, "hard")
    for d in (2, 4, 8):
        one(4000, 128, d, "hard")
    one(4000, 128, 6, "soft")
    return dict(bench="npkscale", records=recs)


def bench_convntk(args):
    """Structured NTK of a small GCONV vs torch.func Jacobian contraction (and neural-tangents, if its optional
    environment exists), CIFAR-shaped inputs."""
    import subprocess
    import tempfile

    import numpy as np

    def make():
        return npx.ConvDGN(
            "gconv",
            in_channels=3,
            out_dim=10,
            channels=(16, 16, 32, 32),
            hidden=(64, 64),
            tied=True,
            generator=torch.Generator().manual_seed(0),
        )

    net = make()
    n = args.n or 32
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ts = timeit(lambda: npx.ntk(net, x, params="all"), args.repeat)
    tj = timeit(lambda: npx.ntk(net, x, params="all", method="jacobian"), 1)
    ours = npx.ntk(make(), x, params="all")
    diff = (ours - npx.ntk(make(), x, params="all", method="jacobian")).abs().max().item()
    fl = _conv_ntk_flops(net, n)
    rate = _gemm_rate()
    floor = _conv_ntk_floor_flops(net, n)
    rec = dict(
        bench="convntk",
        n=n,
        structured_s=ts,
        jacobian_s=tj,
        speedup=tj / ts,
        max_abs_diff=diff,
        flops=fl,
        structured_gflops=sum(v for k, v in fl.items() if k in ("signals", "formation", "contraction")) / ts / 1e9,
        large_gemm_gflops=rate,
        floor_gflop=floor / 1e9,
        floor_s=floor / rate / 1e9,
        structured_over_floor=ts / (floor / rate / 1e9),
        jacobian_over_floor=tj / (floor / rate / 1e9),  # the largest speed-up over torch.func any method could show
    )
    py = _peer_python()
    if not py:
        rec["neural_tangents"] = {"skipped": "neural-tangents environment absent (bash scripts/peer-env.sh)"}
        return rec
    ref = make()
    with tempfile.TemporaryDirectory() as d:
        z = {f"W{i}": l.weight.detach().numpy() for i, l in enumerate(ref.value_layers)}
        z.update({f"b{i}": l.bias.detach().numpy() for i, l in enumerate(ref.value_layers)})
        n_conv = sum(isinstance(l, torch.nn.Conv2d) for l in ref.value_layers)
        impls = ["STRUCTURED_DERIVATIVES", "JACOBIAN_CONTRACTION"]
        if n <= 64:  # NTK-vector products: 46 s at n = 32, growing as n^2 (one product per pair of inputs)
            impls.append("NTK_VECTOR_PRODUCTS")
        else:
            rec["neural_tangents_left_out"] = "NTK_VECTOR_PRODUCTS (46 s at n = 32, n^2 growth)"
        np.savez(f"{d}/in.npz", x=x.numpy(), ns=np.array([n]), n_conv=np.array(n_conv), impls=np.array(impls), **z)
        r = subprocess.run(
            [py, str(__import__("pathlib").Path(__file__).with_name("nt_peer.py")), f"{d}/in.npz", f"{d}/out.json"],
            stdout=subprocess.PIPE,
            text=True,
            timeout=3000,
        )
        if r.returncode:
            rec["neural_tangents"] = {"error": f"exit status {r.returncode}"}
            return rec
        peer = json.loads(open(f"{d}/out.json").read())
        k_nt = np.load(f"{d}/out.json.kernel.npy")
        peer["max_rel_diff_vs_neuralpath"] = float(
            np.abs(k_nt - ours.numpy() / 10).max() / np.abs(ours.numpy() / 10).max()
        )
        rec["neural_tangents"] = peer
    return rec


def _conv_ntk_floor_flops(net, n):
    """A lower bound on the FLOPs of the conv NTK (params = all, traced) of n inputs by any of the known routes
    (ours, torch.func's Jacobian contraction, neural-tangents' three): the forward pass (torch's FLOP counter), the k
    backward signals through every layer's adjoint but the first, and per conv layer the cheaper of the two
    contractions over the n(n+1)/2 pairs of a symmetric kernel, per-example weight gradients (formed once per input,
    then <G, G'>) or patch Gram x signal Gram (nothing formed per input); dense layers at the structured
    (fan_in + k fan_out) per pair."""
    from torch.utils.flop_counter import FlopCounterMode

    k, hw, pairs = net.out_dim, net.image_size**2, n * (n + 1) / 2
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(2, net.in_channels, net.image_size, net.image_size))
    total = fc.get_total_flops() / 2 * n
    for i, layer in enumerate(net.value_layers):
        if isinstance(layer, torch.nn.Conv2d):
            w, co = layer.weight.numel(), layer.out_channels
            if i > 0:
                total += 2.0 * n * k * w * hw
            by_gradients = 2.0 * n * k * w * hw + 2.0 * pairs * k * (w + co)
            by_patch_grams = 2.0 * pairs * hw * hw * (w // co + k * co)
            total += min(by_gradients, by_patch_grams)
        else:
            fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
            if i > 0:
                total += 2.0 * n * k * fan_in * fan_out
            total += 2.0 * pairs * (fan_in + k * fan_out)
    return total


def _conv_ntk_flops(net, n, pairs=None):
    """Multiply-adds x 2 of the structured conv NTK on n inputs (traced, params = value): k backward signals through
    every layer's adjoint but the first, each conv layer's per-example weight gradient G^k = D^k P^T, and the
    pairwise contraction; and, per conv layer, what one pair would cost by the patch-Gram route
    sum_{p,p'} <patch(p), patch'(p')> <delta(p), delta'(p')> instead of <G, G'> (the route neural-tangents'
    structured derivatives can take): HW^2 (Ci kh kw + k Co) against k Co Ci kh kw."""
    k = net.out_dim
    pairs = n * n if pairs is None else pairs
    hw = net.image_size**2
    out = dict(signals=0.0, formation=0.0, contraction=0.0)
    per_layer = []
    for i, layer in enumerate(net.value_layers):
        if isinstance(layer, torch.nn.Conv2d):
            w = layer.weight.numel()
            if i > 0:
                out["signals"] += 2.0 * n * k * w * hw
            out["formation"] += 2.0 * n * k * w * hw
            out["contraction"] += 2.0 * pairs * k * (w + layer.out_channels)
            ci_kk = w // layer.out_channels
            per_layer.append(
                dict(
                    layer=i,
                    jacobian_pair_flops=2.0 * k * w,
                    patch_gram_pair_flops=2.0 * hw * hw * (ci_kk + k * layer.out_channels),
                )
            )
        else:
            fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
            if i > 0:
                out["signals"] += 2.0 * n * k * fan_in * fan_out
            out["contraction"] += 2.0 * pairs * (fan_in + k * fan_out)
    return dict(out, per_conv_layer=per_layer)


def bench_convntkfull(args):
    """The structured NTK (params = all = value for the tied net, float32, traced) of the paper's full-width GCONV
    (channels 64, 64, 128, 128; dense 256, 256) on n = 1,000 CIFAR-10 training images (``--n``; the JPEG copy when
    no official copy is installed, random CIFAR-shaped inputs when neither is), seed-0 weights: wall time, peak
    memory, the FLOP count and the rate it implies, and what the Jacobian the peers contract would occupy."""
    from neuralpath import datasets
    from neuralpath.errors import NeuralpathError
    from neuralpath.experiments.budget import conv_widths

    n = args.n or 1000
    try:
        x, _ = datasets.load("cifar10", "train", limit=n, seed=0)
        source = datasets.source_label("cifar10")
    except (FileNotFoundError, NeuralpathError):
        x, source = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "random"
    ch, hid = conv_widths(1.0)
    net = npx.ConvDGN("gconv", channels=ch, hidden=hid, tied=True, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    K = npx.ntk(net, x, params="all", block=args.block or 250, progress=True)
    t = time.perf_counter() - t0
    nb = -(-n // (args.block or 250))
    featurised = n + (args.block or 250) * nb * (nb - 1) // 2  # inputs featurised: every row block, every column
    fl = _conv_ntk_flops(net, featurised, pairs=n * (n + 1) / 2)  # block above the diagonal
    total = fl["signals"] + fl["formation"] + fl["contraction"]
    return dict(
        bench="convntkfull",
        n=n,
        inputs=source,
        block=args.block or 250,
        params=params,
        seconds=t,
        gflop=total / 1e9,
        gflops=total / t / 1e9,
        inputs_featurised=featurised,
        peak_rss_gib=peak_rss_gib(),
        finite=bool(torch.isfinite(K).all()),
        min_eig=float(torch.linalg.eigvalsh(K.double()).min()),
        max_diag=float(K.diagonal().max()),
        jacobian_gib_float32=n * net.out_dim * params * 4 / 2**30,  # what vmap(jacrev) / neural-tangents hold
    )


def _stack_step(regime, arch, r, kw, x, y):
    """One engine optimiser step (Adam 1e-4, batch 32 per run) of a stack of ``r`` runs of ``regime`` on the
    CIFAR-shaped batch pool (x, y), frozen gates taken from the bit-packed cache."""
    import torch.nn.functional as F

    from neuralpath.stacks import make_stack

    st = make_stack([build_regime(regime, arch, s, None, **kw)[0] for s in range(r)])
    st.cache_frozen_gates(x, [torch.arange(len(x))] * r)
    opt = make_optimizer("adam", st.parameters(), 1e-4)  # the engine's optimiser

    def step():
        idx = torch.randint(0, len(x), (r, 32))
        o = st.forward(x[idx], idx)
        loss = F.cross_entropy(o.reshape(-1, 10), y[idx].reshape(-1), reduction="sum") / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_thpstep(args):
    """Per-run optimiser step (Adam, batch 32) of GCONV (``--arch vconv``: VCONV) per regime kind, x1/4 as a stack of
    4 and full width single, median of ``--repeat`` x 3 steps, under this process's THP_MEM_ALLOC_ENABLE (set it to 0
    or 1 around the call)."""
    from neuralpath.experiments.budget import conv_widths

    arch = args.arch or "gconv"
    torch.manual_seed(0)
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))
    gemm = _gemm_rate()
    res, of_gemm = {}, {}
    for mult, r in ((0.25, 4), (1.0, 1)):
        ch, hid = conv_widths(mult)
        for regime in ("relu", "frnpf-ii", "dlnpf"):
            step = _stack_step(regime, arch, r, dict(in_shape=(3, 32, 32), channels=ch, hidden=hid), x, y)
            key = f"x{mult:g}-{regime}-R{r}"
            res[key] = timeit(lambda: [step() for _ in range(3)], args.repeat, 2) / 3 / r
            of_gemm[key] = _conv_step_flops(arch, ch, hid, regime) / res[key] / 1e9 / gemm
    return dict(
        bench="thpstep",
        arch=arch,
        thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"),
        large_gemm_gflops=gemm,
        per_run_step_s=res,
        of_gemm=of_gemm,
    )


def bench_convratio(args):
    """The engine issue's ratio goals for one conv net (default: VCONV at the paper's widths, single runs): frozen /
    ReLU and DLNPF / ReLU per-step time, measured as ``--repeat`` interleaved rounds (ReLU, frozen, DLNPF, 3 steps
    each, after one warm-up round), so every ratio has a baseline from the same minute; the median over rounds is
    the figure (single invocations of convstep differed by up to 25% per cell). Each round also measures the
    large-GEMM rate (best of 3 products of 2048^3) and each step's matrix-product FLOPs against it, so the rate goal
    (every regime >= 50% of the GEMM rate at the paper's widths) gets the same interleaved medians."""
    from neuralpath.experiments.budget import conv_widths

    arch = args.arch or "vconv"
    torch.manual_seed(0)
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))
    ch, hid = conv_widths(1.0)
    kw = dict(in_shape=(3, 32, 32), channels=ch, hidden=hid)
    regs = ("relu", "frnpf-ii", "dlnpf")
    steps = {reg: _stack_step(reg, arch, 1, kw, x, y) for reg in regs}
    flops = {reg: _conv_step_flops(arch, ch, hid, reg) for reg in regs}
    for st in steps.values():
        st()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rounds = []
    for _ in range(args.repeat):
        gemm = 2 * 2048**3 / min(timeit(lambda: a @ b, 1, 0) for _ in range(3)) / 1e9
        t = {reg: timeit(lambda st=st: [st() for _ in range(3)], 1, 0) / 3 for reg, st in steps.items()}
        rounds.append(
            dict(
                t,
                frozen_over_relu=t["frnpf-ii"] / t["relu"],
                dlnpf_over_relu=t["dlnpf"] / t["relu"],
                large_gemm_gflops=gemm,
                **{f"{reg}_of_gemm": flops[reg] / t[reg] / 1e9 / gemm for reg in regs},
            )
        )
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return dict(bench="convratio", arch=arch, width=1.0, step_gflop=flops, rounds=rounds, median=med)


def _paired_dlnpf_forward(net, x):
    """A DLNPF conv net's forward with its feature and value networks as one convolution per layer: the first layer
    one conv with both networks' filters, the others a grouped conv (groups = 2) over [feature, value] channels.
    Same values as ``net(x)``; a trial design for the DLNPF step (not used by the library)."""
    import torch.nn.functional as F

    x = net._prepare(x)
    beta, eps, pad = net.beta, net.eps, net.kernel_size // 2
    fl, vl = net.feature_layers, net.value_layers

    def wb(l):
        b = None if fl[l].bias is None else torch.cat([fl[l].bias, vl[l].bias])
        return torch.cat([fl[l].weight, vl[l].weight]), b

    q = F.conv2d(x, *wb(0), padding=pad)
    zf = zv = x
    for l in range(net.n_conv):
        c = fl[l].weight.shape[0]
        qf, qv = q[:, :c], q[:, c:]
        zf, zv = torch.relu(qf), qv * ((1 + eps) * torch.sigmoid(beta * qf))
        if l + 1 < net.n_conv:
            q = F.conv2d(torch.cat([zf, zv], 1), *wb(l + 1), padding=pad, groups=2)
    zf, zv = net.transition(net.n_conv, zf), net.transition(net.n_conv, zv)
    for l in range(net.n_conv, net.depth - 1):
        qf = fl[l](zf)
        zv, zf = vl[l](zv) * ((1 + eps) * torch.sigmoid(beta * qf)), torch.relu(qf)
    return vl[-1](net.transition(net.depth - 1, zv))


def bench_dlnpfvariants(args):
    """Session 10: two designs tried for the DLNPF step, full-width conv net (``--arch``, default gconv), Adam,
    batch 32, interleaved rounds as convratio: the library's DLNPF step; its feature and value convolutions as one
    grouped convolution per layer (``_paired_dlnpf_forward``); ``torch.compile`` (inductor) of the DLNPF and of the
    ReLU forward. Ratios to the eager ReLU step of the same round."""
    import torch.nn.functional as F

    from neuralpath.experiments.budget import conv_widths

    arch = args.arch or "gconv"
    torch.manual_seed(0)
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))
    ch, hid = conv_widths(1.0)
    kw = dict(in_shape=(3, 32, 32), channels=ch, hidden=hid)
    relu, dl = build_regime("relu", arch, 0, None, **kw)[0], build_regime("dlnpf", arch, 0, None, **kw)[0]
    with torch.no_grad():
        err = float((_paired_dlnpf_forward(dl, x[:8]) - dl(x[:8])).abs().max())

    def stepper(net, fwd):
        opt = make_optimizer("adam", [p for p in net.parameters() if p.requires_grad], 1e-4)

        def step():
            idx = torch.randint(0, len(x), (32,))
            loss = F.cross_entropy(fwd(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    steps = {
        "relu": stepper(relu, relu),
        "dlnpf": stepper(dl, dl),
        "dlnpf_grouped": stepper(dl, lambda z: _paired_dlnpf_forward(dl, z)),
        "relu_compiled": stepper(relu, torch.compile(relu)),
        "dlnpf_compiled": stepper(dl, torch.compile(dl)),
    }
    t0 = time.perf_counter()
    for st in steps.values():  # warm-up (and compilation)
        st()
        st()
    warm_s = time.perf_counter() - t0
    rounds = []
    for _ in range(args.repeat):
        t = {k: timeit(lambda st=st: [st() for _ in range(3)], 1, 0) / 3 for k, st in steps.items()}
        rounds.append(dict(t, **{f"{k}_over_relu": t[k] / t["relu"] for k in steps if k != "relu"}))
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return dict(bench="dlnpfvariants", arch=arch, grouped_max_abs_diff=err, warmup_s=warm_s, rounds=rounds, median=med)


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument(
        "which",
        choices=[
            "npk",
            "ntk",
            "step",
            "stream",
            "convnpk",
            "ensemble",
            "ntk10k",
            "peer",
            "data",
            "npkscale",
            "convntk",
            "convntkfull",
            "roofline",
            "convstep",
            "npkload",
            "convnpk_scale",
            "resnetnpk",
            "thpstep",
            "convratio",
            "dlnpfvariants",
            "fcbackward",
        ],
    )
    p.add_argument("--arch", default=None, help="convstep: gconv or vconv only")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="ensemble: the row's optimiser")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--block", type=int, default=None, help="convntkfull: inputs per Gram tile")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rec = globals()[f"bench_{args.which}"](args)
    rec.update(
        threads=torch.get_num_threads(), torch=torch.__version__, peak_rss_gib=rec.get("peak_rss_gib", peak_rss_gib())
    )
    print(json.dumps(rec))


if __name__ == "__main__":
    sys.exit(main())
