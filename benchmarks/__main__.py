"""Benchmarks: ratios against a baseline measured in the same run, medians of repeats, peak memory.

    python -m benchmarks npk      NPK (FC 6x128, n=4000) vs one dense GEMM with the same multiply-adds
    python -m benchmarks ntk      structured NTK vs torch.func Jacobian contraction and NTK-vector products (n=512)
    python -m benchmarks step     frozen-gate DGN (FLNPF/FRNPF) optimiser step vs ReLU step, FC 6x128, batch 32
    python -m benchmarks stream   the full 60,000 x 60,000 MNIST NPK streamed to a memmap (long: ~minutes)
    python -m benchmarks convnpk  pairs per second of the full-size GCONV NPK
Each prints a JSON line; docs/PERFORMANCE.md records the figures.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

import neuralpath as npx
from neuralpath.regimes import build_regime


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
    return dict(bench="npk", n=n, gemm_s=t_gemm, npk_s=t_npk, npk_blocked1024_s=t_npk_blocked,
                ratio=t_npk / t_gemm, ratio_blocked=t_npk_blocked / t_gemm)


def bench_ntk(args):
    n = args.n or 512
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    t_s = timeit(lambda: npx.ntk(net, x, params="all"), args.repeat)
    t_j = timeit(lambda: npx.ntk(net, x, params="all", method="jacobian"), max(1, args.repeat // 2), warmup=0)
    small = x[:128]
    t_s_small = timeit(lambda: npx.ntk(net, small, params="all"), args.repeat)
    t_vp = timeit(lambda: npx.ntk(net, small, params="all", method="vp"), 1, warmup=0)
    return dict(bench="ntk", n=n, structured_s=t_s, jacobian_s=t_j, speedup_vs_jacobian=t_j / t_s,
                n_vp=128, structured_small_s=t_s_small, vp_s=t_vp, speedup_vs_vp=t_vp / t_s_small)


def bench_step(args):
    x, y = mnist(32 * 50), torch.randint(0, 10, (32 * 50,))
    out = {}
    for regime in ("relu", "frnpf-ii", "dlnpf"):
        net, params = build_regime(regime, "fc", 0, in_shape=(1, 28, 28))
        opt = torch.optim.Adam(params, lr=1e-4, eps=1e-7)

        def epoch():
            for i in range(0, len(y), 32):
                loss = torch.nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        out[regime] = timeit(epoch, args.repeat) / 50
    return dict(bench="step", batch=32, step_s=out, frozen_over_relu=out["frnpf-ii"] / out["relu"],
                dlnpf_over_relu=out["dlnpf"] / out["relu"])


def bench_stream(args):
    n = args.n or 60000
    net, _ = build_regime("relu", "fc", 0, in_shape=(1, 28, 28))
    x = mnist(n)
    out = args.out or "/tmp/neuralpath-npk60k.npy"
    t = time.perf_counter()
    npx.npk(net, x, out=out, block=4096, progress=True)
    return dict(bench="stream", n=n, seconds=time.perf_counter() - t, peak_rss_gib=peak_rss_gib(), out=out)


def bench_convnpk(args):
    n = args.n or 64
    net = npx.ConvDGN("gconv", in_channels=3, out_dim=10, tied=True)
    x = torch.rand(n, 3, 32, 32)
    t = timeit(lambda: npx.npk(net, x, block=32), max(1, args.repeat // 2))
    return dict(bench="convnpk", n=n, seconds=t, pairs_per_s=n * (n + 1) / 2 / t)


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("which", choices=["npk", "ntk", "step", "stream", "convnpk"])
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rec = globals()[f"bench_{args.which}"](args)
    rec.update(threads=torch.get_num_threads(), torch=torch.__version__, peak_rss_gib=rec.get("peak_rss_gib", peak_rss_gib()))
    print(json.dumps(rec))


if __name__ == "__main__":
    sys.exit(main())
