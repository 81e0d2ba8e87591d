"""The Gram engine (kernels/gram.py) on its own: both of its paths (features kept for every tile when they fit the
budget, or recomputed per tile) give the kernel of a direct computation, symmetric or not, and the kept path
featurises every input once."""

import json

import numpy as np
import pytest
import torch

import neuralpath as npx
from neuralpath.kernels.gram import gram


def test_both_feature_paths_give_the_direct_kernel():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(11, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    seen = []

    def featurize(x):
        seen.append(len(x))
        return torch.tanh(x)

    def pair(a, b):
        return a @ b.T

    for other, direct in ((None, torch.tanh(x1) @ torch.tanh(x1).T), (x2, torch.tanh(x1) @ torch.tanh(x2).T)):
        for per_input in (None, 32):  # None: recompute per tile; 32 bytes per input: all kept
            seen.clear()
            K = gram(featurize, pair, x1, other, block=3, dtype=torch.float64, feature_bytes_per_input=per_input)
            assert (K - direct).abs().max().item() <= 1e-14
            inputs = len(x1) + (0 if other is None else len(other))
            assert (sum(seen) == inputs) == (per_input is not None), (per_input, sum(seen), inputs)


def test_an_interrupted_stream_resumes_after_its_finished_tiles(tmp_path, monkeypatch):
    """A stream to a file with an identity keeps its partial file and journal when interrupted; the same call
    continues after the journal's tiles (they are not computed again) and gives the uninterrupted kernel exactly;
    other inputs or another identity start afresh."""
    from neuralpath.kernels import gram as G

    monkeypatch.setattr(G, "JOURNAL_SECONDS", 0.0)
    x = torch.rand(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "K.npy"
    calls = []

    def pair(a, b, fail_at=None):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return a @ b.T

    kw = dict(block=16, out=out, dtype=torch.float64, progress=False)  # 4 row blocks: 10 tiles of the upper triangle

    def direct(v):  # the same tiles computed in memory in one go
        return G.gram(lambda u: u, lambda a, b: a @ b.T, v, **dict(kw, out=None)).numpy()

    with pytest.raises(KeyboardInterrupt):
        G.gram(lambda v: v, lambda a, b: pair(a, b, fail_at=4), x, identity="k1", **kw)
    partial, journal = tmp_path / ".K.npy.partial.npy", tmp_path / ".K.npy.partial.json"
    assert not out.exists() and partial.exists() and json.loads(journal.read_text())["done"] == 3
    calls.clear()
    G.gram(lambda v: v, pair, x, identity="k1", **kw)
    assert len(calls) == 7 and not partial.exists() and not journal.exists()
    assert np.array_equal(np.load(out), direct(x))
    for other in (dict(x=x + 1, identity="k1"), dict(x=x, identity="k2")):  # a partial of another kernel: discarded
        out.unlink()
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            G.gram(lambda v: v, lambda a, b: pair(a, b, fail_at=4), x, identity="k1", **kw)
        calls.clear()
        G.gram(lambda v: v, pair, other["x"], identity=other["identity"], **kw)
        assert len(calls) == 10 and np.array_equal(np.load(out), direct(other["x"]))
    out.unlink()  # without an identity nothing is kept
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        G.gram(lambda v: v, lambda a, b: pair(a, b, fail_at=4), x, **kw)
    assert not partial.exists() and not journal.exists()


def test_a_stream_identity_covers_weights_buffers_and_options():
    from neuralpath.kernels.gram import identity_of

    net = npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2)
    a = identity_of(net, kernel="npk")
    assert a == identity_of(net, kernel="npk") and a != identity_of(net, kernel="ntk")
    with torch.no_grad():
        next(net.parameters())[0, 0] += 1e-7
    assert identity_of(net, kernel="npk") != a


def test_npk_streams_resume_and_equal_an_uninterrupted_stream(tmp_path, monkeypatch):
    from neuralpath.kernels import gram as G
    from neuralpath.kernels import npk as N

    monkeypatch.setattr(G, "JOURNAL_SECONDS", 0.0)
    net = npx.FCDGN(in_dim=6, width=5, depth=3, out_dim=2).double()
    x = torch.rand(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = np.load(npx.npk(net, x, block=16, out=tmp_path / "A.npy"))
    real, n = N.npk_pair, []

    def flaky(*a, **k):
        n.append(1)
        if len(n) == 3 and fail:
            raise KeyboardInterrupt
        return real(*a, **k)

    fail = True

    monkeypatch.setattr(N, "npk_pair", flaky)
    with pytest.raises(KeyboardInterrupt):
        npx.npk(net, x, block=16, out=tmp_path / "B.npy")
    assert json.loads((tmp_path / ".B.npy.partial.json").read_text())["done"] == 2
    n.clear()
    fail = False
    assert np.array_equal(np.load(npx.npk(net, x, block=16, out=tmp_path / "B.npy")), want) and len(n) == 4


def test_heap_allocations_are_set_for_the_outermost_kernel_and_restored(monkeypatch):
    """Inside the engine glibc serves large allocations from the heap (no mmap, no trimming); on leaving, its
    defaults are restored and the free memory given back; a kernel inside a kernel leaves the outer setting alone;
    NEURALPATH_HEAP=0 changes nothing."""
    from neuralpath.kernels import gram as G

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(G, "_glibc", lambda: FakeLibc())
    x = torch.rand(5, 3, dtype=torch.float64)

    def pair(a, b):  # a kernel computed inside the pair function of another
        G.gram(lambda v: v, lambda u, w: u @ w.T, a, dtype=torch.float64)
        return a @ b.T

    K = G.gram(lambda v: v, pair, x, block=2, dtype=torch.float64)
    assert torch.allclose(K, x @ x.T, rtol=0, atol=1e-15)
    assert calls == [
        ("mallopt", -4, 0),
        ("mallopt", -1, -1),
        ("mallopt", -4, 65536),
        ("mallopt", -1, 128 * 1024),
        ("trim", 0),
    ]
    calls.clear()
    monkeypatch.setenv("NEURALPATH_HEAP", "0")
    G.gram(lambda v: v, lambda a, b: a @ b.T, x)
    assert calls == []


def test_progress_log_prints_lines_not_a_bar(monkeypatch, capsys):
    """progress="log" (the CLI's choice when stderr is not a terminal): plain lines with tiles done, rate and time
    left, at most every LOG_SECONDS and at the end."""
    from neuralpath.kernels import gram as G

    x = torch.rand(40, 3, dtype=torch.float64)
    monkeypatch.setattr(G, "LOG_SECONDS", 1e9)
    G.gram(lambda v: v, lambda a, b: a @ b.T, x, block=16, progress="log", desc="NPK")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NPK: 6 of 6 tiles (100.0%)" in err and "\r" not in err
    monkeypatch.setattr(G, "LOG_SECONDS", 0.0)
    G.gram(lambda v: v, lambda a, b: a @ b.T, x, block=16, progress="log", desc="NPK")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 6 and "1 of 6 tiles" in lines[0] and "h left" in lines[0]


def test_core_share_counts_the_cores_other_processes_keep_busy():
    """The thread count for the next tile: torch's count less the cores others kept busy over the last window
    (rounded, at least one); this process's own CPU time never moves it; no reading leaves the count alone."""
    from neuralpath.kernels.gram import CoreShare

    readings = iter(
        [
            (0.0, 0.0, 0.0),  # first reading: no window yet
            (0.05, 0.1, 0.05),  # inside the window: the last estimate holds
            (0.2, 0.4, 0.2),  # 0.4 busy, 0.2 of it ours, over 0.2 s: one other core
            (0.4, 0.8, 0.4),  # the same again
            (0.6, 1.0, 0.6),  # every busy second ours (two threads): nobody else
            (0.8, 1.26, 0.8),  # 0.06 others / 0.2 s = 0.3 of a core: rounds to none
            None,  # /proc/stat unreadable
        ]
    )
    cs = CoreShare()
    cs.sample = lambda: next(readings)  # type: ignore[method-assign]
    assert [cs.threads(2) for _ in range(7)] == [2, 2, 1, 1, 2, 2, 2]
    assert CoreShare().threads(1) == 1
    cs = CoreShare()
    seq = iter([(0.0, 0.0, 0.0), (1.0, 4.4, 2.0)])  # 2.4 cores of others on an 8-thread process
    cs.sample = lambda: next(seq)  # type: ignore[method-assign]
    assert cs.threads(8) == 8 and cs.threads(8) == 6 and round(cs.others, 6) == 2.4


def test_core_share_reads_the_busy_time_of_its_own_cpus(tmp_path, monkeypatch):
    """Only this process's CPUs count, and only their busy columns (user, nice, system, irq, softirq, steal)."""
    import os

    from neuralpath.kernels import gram as G

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 999 999 999 999 999 999 999 0 0\n"
        "cpu0 100 1 10 5000 70 2 3 4 0 0\n"  # busy: 100 + 1 + 10 + 2 + 3 + 4 = 120 ticks (idle, iowait not)
        "cpu1 900 900 900 900 900 900 900 900 0 0\n"  # not ours
        "cpu2 50 0 5 4000 0 0 0 5 0 0\n"  # 60 ticks
        "intr 12345\n"
    )
    cs = G.CoreShare()
    cs.STAT = str(stat)
    wall, busy, own = cs.sample()  # type: ignore[misc]
    assert busy == pytest.approx(180 / os.sysconf("SC_CLK_TCK"))
    cs.STAT = str(tmp_path / "missing")
    assert cs.sample() is None and cs.threads(2) == 2


def test_tiles_run_on_the_threads_core_share_gives_and_torch_count_comes_back(monkeypatch):
    """With others busy the tiles (and the cached features) run on fewer threads; torch's count is restored after,
    also when a tile fails; NEURALPATH_THREADS=fixed keeps it throughout; other values are refused in one line."""
    from neuralpath.errors import NeuralpathError
    from neuralpath.kernels import gram as G

    class Busy(G.CoreShare):
        def threads(self, n):
            return max(1, n - 1)

    monkeypatch.setattr(G, "_CORES", Busy())
    seen = []

    def pair(a, b):
        seen.append(torch.get_num_threads())
        return a @ b.T

    x = torch.rand(9, 3, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        K = G.gram(lambda v: v, pair, x, block=4, dtype=torch.float64)
        assert torch.equal(K, K.T) and seen == [1] * 6 and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setenv("NEURALPATH_THREADS", "fixed")
        G.gram(lambda v: v, pair, x, block=4, dtype=torch.float64)
        assert seen == [2] * 6
        monkeypatch.setenv("NEURALPATH_THREADS", "auto")

        def broken(a, b):
            raise RuntimeError("tile failed")

        with pytest.raises(RuntimeError, match="tile failed"):
            G.gram(lambda v: v, broken, x, block=4)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("NEURALPATH_THREADS", "3")
        with pytest.raises(NeuralpathError, match="NEURALPATH_THREADS='3': use one of auto, fixed"):
            G.gram(lambda v: v, pair, x, block=4)
    finally:
        torch.set_num_threads(before)


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.a = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 64, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))
        return self.head(h.flatten(1))


def test_every_kernel_is_the_same_on_one_and_on_two_threads(monkeypatch):
    """The premise of the adaptive thread count: a tile's values do not depend on it (float32, bit for bit) for the
    FC and GCONV NPKs, the NTK and the any-network NPK of a small ResNet. Fails if the BLAS or a reduction
    splits its work differently with the thread count; then CoreShare must go."""
    from neuralpath import from_module

    monkeypatch.setenv("NEURALPATH_THREADS", "fixed")  # each kernel on exactly the count set below
    torch.manual_seed(0)
    fc = npx.FCDGN(12, width=16, depth=3, tied=True)
    conv = npx.ConvDGN("gconv", channels=(4, 4, 8, 8), hidden=(16, 16), tied=True)
    model = _Residual()
    xs, xi, xa = torch.rand(300, 12), torch.rand(40, 3, 32, 32), torch.rand(60, 3, 8, 8)
    any_net = from_module(model, xa[:2])
    jobs = {
        "fc npk": lambda: npx.npk(fc, xs, block=128),
        "fc ntk": lambda: npx.ntk(fc, xs[:90], block=32),
        "gconv npk": lambda: npx.npk(conv, xi, block=16),
        "any-network npk": lambda: npx.npk(any_net, xa, block=32),
    }
    before = torch.get_num_threads()
    try:
        for name, job in jobs.items():
            torch.set_num_threads(1)
            one = job()
            torch.set_num_threads(2)
            two = job()
            assert torch.equal(one, two), name
    finally:
        torch.set_num_threads(before)
