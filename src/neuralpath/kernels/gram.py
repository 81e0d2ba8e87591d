"""The blocked Gram engine under every kernel of neuralpath (NPK, NTK).

``gram(featurize, pair, x1, x2)`` computes K[i, j] = pair(featurize(x1[I]), featurize(x2[J]))[i, j] tile by tile:
- tiles of ``block`` rows x ``block`` columns; in the symmetric case (x2 is None) only tiles with J >= I are
  computed and mirrored (diagonal tiles too), so each pair is computed once and K equals K.T exactly;
- per-input features are computed once and kept when they fit in ``feature_budget`` bytes (default: a quarter of
  the available memory, at least 1 GiB), else per tile;
- the result is a tensor in memory, or streamed into a ``.npy`` memmap (``out=``) written under a temporary
  name and renamed when complete;
- before any work it refuses, with a size estimate, a result that fits neither in memory (no ``out``) nor on the
  output's disk;
- a stream to ``out`` with an ``identity`` (the caller's description of what it computes: the network's weights and
  the options; the engine adds the inputs) resumes: every ``JOURNAL_SECONDS`` the finished tiles are made durable
  (fsync) and counted in a journal beside the partial file, and a later call with the same identity, inputs, tile
  size and dtype continues after them (a partial of anything else is discarded). Single process only;
- with torch.distributed initialised, tiles are split among ranks (round robin): with ``out`` each rank writes its
  tiles into the one shared .npy file and rank 0 renames it after a barrier (the ranks must share a file system);
  in memory, each rank fills its tiles of a zero matrix and one all-reduce (sum) gives every rank the whole kernel.
  Each entry is computed by exactly one rank with the same code as in one process, so the result is bit for bit
  the single-process one;
- on a CPU that other processes keep busy, tiles run on fewer intra-op threads (:class:`CoreShare`): torch's
  threads wait for each other at every operation, and a thread that shares its core with another process holds
  the others up at each of a tile's many short GEMMs and passes (docs/PERFORMANCE.md, session 15).
  ``NEURALPATH_THREADS=fixed`` keeps torch's thread count throughout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NeuralpathError, env_choice
from ..io import hash_tensor
from ..precision import exact


def _avail_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


JOURNAL_SECONDS = 30.0  # how often a resumable stream records its finished tiles


def identity_of(net, **options) -> str:
    """A digest of a network's parameters and buffers (names, dtypes, shapes, values) and of ``options``: what a
    resumable kernel stream is a stream of, besides its inputs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(net).__module__}.{type(net).__qualname__}|{sorted(options.items())!r}".encode())
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        h.update(f"|{name}".encode())
        hash_tensor(h, t)
    return h.hexdigest()


def tiling(net, *, block, out, dtype, progress, **what) -> dict:
    """How the Gram engine tiles and where it writes, for a kernel of ``net``: a stream to ``out`` gets the identity
    that makes it resumable (``what``: the kernel's name and options)."""
    ident = identity_of(net, **what) if out is not None else None
    return dict(block=block, out=out, dtype=dtype, progress=progress, identity=ident)


def _input_digest(identity, x1, x2, block, dtype) -> str:
    h = hashlib.blake2b(identity.encode(), digest_size=16)
    h.update(f"|{block}|{dtype}|".encode())
    for x in (x1, x2):
        if x is None:
            h.update(b"|symmetric|")
        else:
            hash_tensor(h, x)
    return h.hexdigest()


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _TileWriter:
    """Writes tiles into a .npy file with positional writes (no mapping), so resident memory stays at the tile size
    however large the kernel is; supports ``w[i0:i1, j0:j1] = tile``."""

    def __init__(self, path, n2, itemsize):
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        self.fd = os.open(path, os.O_WRONLY)
        self.n2, self.itemsize = n2, itemsize

    def __setitem__(self, key, tile):
        rows, cols = key
        tile = np.ascontiguousarray(tile)
        for r in range(tile.shape[0]):
            pos = self.offset + ((rows.start + r) * self.n2 + cols.start) * self.itemsize
            os.pwrite(self.fd, tile[r].tobytes(), pos)

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        self.sync()
        os.close(self.fd)


def check_size(n1: int, n2: int, itemsize: int, out=None, memory_limit: int | None = None):
    """Refuse before any work when an (n1, n2) result fits neither in memory (no out) nor on out's disk."""
    need = n1 * n2 * itemsize
    if out is None:
        limit = memory_limit if memory_limit is not None else int(0.8 * _avail_memory())
        if need > limit:
            raise NeuralpathError(
                f"the ({n1}, {n2}) kernel needs {need / 2**30:.2f} GiB but only {limit / 2**30:.2f} GiB "
                "of memory is available; pass out=FILE.npy to stream it to disk, or use fewer inputs"
            )
    else:
        out = Path(out)
        if out.is_dir():
            raise NeuralpathError(f"--out {out} is a folder; give a file name ending in .npy")
        if out.suffix != ".npy":
            raise NeuralpathError(f"--out {out}: a kernel is written as a .npy file; give a name ending in .npy")
        parent = out.resolve().parent
        if parent.exists() and not parent.is_dir():
            raise NeuralpathError(f"--out {out}: {parent} is a file, not a folder")
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if need > free:
            raise NeuralpathError(
                f"the ({n1}, {n2}) kernel needs {need / 2**30:.2f} GiB but {parent} has only "
                f"{free / 2**30:.2f} GiB free; choose another output folder or fewer inputs"
            )
    return need


def gram(featurize, pair, x1, x2=None, **kw) -> Any:
    """Blocked Gram matrix; see the module docstring. Returns a tensor, or the out path when ``out`` is given.
    Computed without TF32 on GPUs (:func:`neuralpath.precision.exact`), with large allocations served from the heap
    (:func:`heap_allocations`)."""
    with exact(), heap_allocations():
        return _gram(featurize, pair, x1, x2, **kw)


@contextlib.contextmanager
def heap_allocations():
    """With glibc (Linux): large allocations come from the process heap instead of a fresh mmap each, so a tile's
    pair-sized tensors reuse memory that is already mapped (a fresh 256 MB tensor costs page faults worth several
    passes over it; docs/PERFORMANCE.md, session 12); on leaving, the default is restored and the freed memory given
    back to the system. The price: the process's peak memory grows (freed blocks of other sizes stay mapped; 4.2 ->
    6.4 GiB for the ResNet-18 NPK of 1,000 inputs). ``NEURALPATH_HEAP=0`` turns it off. Elsewhere nothing changes."""
    libc = _glibc()
    if env_choice("NEURALPATH_HEAP", ("1", "0"), "1") == "0" or libc is None or _HEAP_DEPTH[0]:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)  # read as size_t: never trim the heap while inside
    _HEAP_DEPTH[0] += 1
    try:
        yield
    finally:
        _HEAP_DEPTH[0] -= 1
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


_HEAP_DEPTH = [0]  # a kernel computed inside another keeps the outer setting


@functools.cache
def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _gram(
    featurize,
    pair,
    x1,
    x2=None,
    *,
    block: int = 1024,
    out=None,
    dtype=torch.float32,
    progress: bool | str = False,
    feature_budget: int | None = None,
    feature_bytes_per_input: int | None = None,
    desc: str = "kernel",
    memory_limit: int | None = None,
    identity: str | None = None,
):
    sym = x2 is None
    x2_ = x1 if sym else x2
    n1, n2 = len(x1), len(x2_)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise NeuralpathError(f"--block {block!r} must be a positive integer (the tile size, e.g. 1024)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = check_size(n1, n2, itemsize, out, memory_limit)
    rank, world = _dist()
    if feature_budget is None:
        feature_budget = max(1 << 30, _avail_memory() // 4)
    job: dict[str, Any] = dict(
        featurize=featurize,
        pair=pair,
        x1=x1,
        x2_=x2_,
        sym=sym,
        block=block,
        dtype=dtype,
        progress=progress,
        feature_budget=feature_budget,
        feature_bytes_per_input=feature_bytes_per_input,
        desc=desc,
        rank=rank,
        world=world,
    )
    if out is None:  # several ranks, in memory: each fills its tiles, then one all-reduce sums them
        K = (torch.zeros if world > 1 else torch.empty)((n1, n2), dtype=dtype)
        return _fill(K.numpy(), K, **job)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial.npy")
    journal = out.with_name(f".{out.name}.partial.json")
    key = _input_digest(identity, x1, x2, block, dtype) if identity is not None and world == 1 else None
    lock = None
    if rank == 0:
        from filelock import FileLock, Timeout

        lock = FileLock(str(out.with_name(f".{out.name}.lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise NeuralpathError(
                f"{out} is being written by another neuralpath process; wait for it or pick " "another --out"
            ) from None
    keep = False  # a resumable partial with a journal survives an interruption (the journal counts durable tiles)
    try:
        start = _resume_point(tmp, journal, key, (n1, n2))
        if rank == 0 and start == 0:
            tmp.unlink(missing_ok=True)  # a stale partial of a killed run of the same name, or of another kernel
            journal.unlink(missing_ok=True)
            if need > 1 << 30 and progress is not False:
                print(f"{desc}: writing a ({n1:,} x {n2:,}) kernel, {need / 2**30:.1f} GiB, to {out}", file=sys.stderr)
            np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.dtype(str(dtype).removeprefix("torch.")), shape=(n1, n2)
            ).flush()
        elif start and progress is not False:
            print(f"{desc}: resuming {out} after {start} finished tiles", file=sys.stderr)
        if world > 1:
            torch.distributed.barrier()
        target = _TileWriter(tmp, n2, itemsize)
        log = _Journal(target, journal, key) if key is not None else None
        try:
            _fill(target, None, start=start, checkpoint=log, **job)
        except BaseException:
            if log is not None and log.done > start:  # keep what is finished: the same call continues after it
                log.flush()
            keep = log is not None and journal.exists()
            if log is not None and keep and progress is not False:
                done = max(log.done, start)
                print(f"{desc}: stopped; {done} finished tiles kept in {tmp}: the same call continues", file=sys.stderr)
            raise
        finally:
            target.close()
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            os.replace(tmp, out)
            journal.unlink(missing_ok=True)
            journal.with_name(journal.name + ".tmp").unlink(missing_ok=True)  # left by a kill inside a journal write
        if world > 1:
            torch.distributed.barrier()
    except BaseException:
        if rank == 0 and not keep:
            tmp.unlink(missing_ok=True)  # nothing half-written stays behind (SIGINT/SIGTERM arrive as exceptions)
            journal.unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            lock.release()
            with contextlib.suppress(OSError):
                os.unlink(lock.lock_file)
    return out


def _resume_point(tmp, journal, key, shape) -> int:
    """How many tiles of a resumable stream are already in its partial file (0: start afresh)."""
    if key is None or not tmp.exists() or not journal.exists():
        return 0
    try:
        j = json.loads(journal.read_text())
        arr = np.load(tmp, mmap_mode="r")
    except (OSError, ValueError):
        return 0
    if j.get("key") != key or tuple(arr.shape) != shape:
        return 0
    return int(j.get("done", 0))


class _Journal:
    """Called by _fill after each finished tile with the count so far: at most every JOURNAL_SECONDS (at the end,
    and by :meth:`flush` when a stream is interrupted) the tiles written so far are made durable (fsync), then
    counted in the journal, written to a temporary name and renamed."""

    def __init__(self, target, path, key):
        self.target, self.path, self.key = target, path, key
        self.done, self.last = 0, time.monotonic()

    def __call__(self, done, final=False):
        self.done = done
        if final or time.monotonic() - self.last >= JOURNAL_SECONDS:
            self.flush()

    def flush(self):
        self.target.sync()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done}))
        os.replace(tmp, self.path)
        self.last = time.monotonic()


LOG_SECONDS = 600.0  # how often progress="log" prints a line


class _ProgressLines:
    """progress="log": a line on stderr every LOG_SECONDS (tiles done, rate, time left) for runs whose stderr is a
    log file rather than a terminal, where a bar would be one endless line of carriage returns."""

    def __init__(self, desc, start, total):
        self.desc, self.start, self.total, self.t0 = desc, start, total, time.monotonic()
        self.last = self.t0

    def __call__(self, done):
        now = time.monotonic()
        if now - self.last < LOG_SECONDS and done != self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        print(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.desc}: {done:,} of {self.total:,} tiles "
            f"({100 * done / self.total:.1f}%), "
            f"{rate * 60:.1f} tiles/min, about {left / 3600:.1f} h left",
            file=sys.stderr,
            flush=True,
        )


class CoreShare:
    """How many intra-op threads the next tile gets: torch's thread count less the cores that *other* processes
    kept busy over the last ``WINDOW`` seconds or more, rounded (at least one). Linux only: the busy time of this
    process's CPUs from ``/proc/stat`` (user, nice, system, irq, softirq, steal), less this process's own CPU time;
    what the process itself does never moves the estimate, so the choice does not oscillate. Elsewhere, with one
    thread, or with ``NEURALPATH_THREADS=fixed``, the count is left alone. The state is the module's (one meter per
    process), so a kernel called right after another starts from the last estimate. Values do not depend on the
    choice: the tests compare every kernel at one and at two threads bit for bit."""

    WINDOW = 0.1  # seconds: 10 clock ticks per CPU at the usual 100 Hz, +-0.2 of a core at worst
    STAT = "/proc/stat"

    def __init__(self):
        self.last: tuple[float, float, float] | None = None
        self.others = 0.0  # cores other processes kept busy over the last window

    def sample(self) -> tuple[float, float, float] | None:
        """(wall clock, busy CPU seconds of this process's CPUs, this process's CPU seconds), or None."""
        try:
            cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
            busy = 0
            with open(self.STAT) as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in cpus:
                        v = [int(t) for t in parts[1:9]]
                        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            return time.monotonic(), busy / _clock_ticks(), time.process_time()
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def threads(self, n: int) -> int:
        """The thread count for the next tile out of ``n`` (torch's own)."""
        if n <= 1:
            return n
        now = self.sample()
        if now is None:
            return n
        if self.last is not None and now[0] - self.last[0] < self.WINDOW:
            return max(1, n - round(self.others))
        if self.last is not None:
            wall = now[0] - self.last[0]
            self.others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
        self.last = now
        return max(1, n - round(self.others))


@functools.cache
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


_CORES = CoreShare()


@contextlib.contextmanager
def _shared_cores():
    """A function that sets the intra-op thread count for the next tile (see :class:`CoreShare`); torch's own
    count is restored on leaving."""
    n = torch.get_num_threads()
    fixed = env_choice("NEURALPATH_THREADS", ("auto", "fixed"), "auto") == "fixed"

    def next_tile():
        k = n if fixed else _CORES.threads(n)
        if k != torch.get_num_threads():
            torch.set_num_threads(k)

    try:
        yield next_tile
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _fill(
    target,
    K,
    *,
    featurize,
    pair,
    x1,
    x2_,
    sym,
    block,
    dtype,
    progress,
    feature_budget,
    feature_bytes_per_input,
    desc,
    rank,
    world,
    start=0,
    checkpoint=None,
):
    """Compute and write the tiles (this rank's share); the first ``start`` of them are already written (a resumed
    stream); ``checkpoint(done)`` is told after each one."""
    from tqdm import tqdm

    n1, n2 = len(x1), len(x2_)
    with _shared_cores() as next_tile:

        def featurize_at(x):  # the features cached before the tiles, on as many threads as a tile
            next_tile()
            return featurize(x)

        cache1 = cache2 = None
        fb = feature_bytes_per_input
        if fb is not None and fb * (n1 + (0 if sym else n2)) <= feature_budget:
            cache1 = [featurize_at(x1[i : i + block]) for i in range(0, n1, block)]
            cache2 = cache1 if sym else [featurize_at(x2_[j : j + block]) for j in range(0, n2, block)]
        tiles = [
            (bi, bj)
            for bi in range((n1 + block - 1) // block)
            for bj in range((n2 + block - 1) // block)
            if not sym or bj >= bi
        ]
        mine = tiles[rank::world]
        bar = tqdm(total=len(mine), initial=start, desc=desc, disable=progress is not True, leave=False)
        log = _ProgressLines(desc, start, len(mine)) if progress == "log" else None
        f1_idx, f1 = None, None
        for done, (bi, bj) in enumerate(mine[start:], start + 1):
            next_tile()
            i0, j0 = bi * block, bj * block
            if cache1 is not None and cache2 is not None:
                a, b = cache1[bi], cache2[bj]
            else:
                if f1_idx != bi:
                    f1_idx, f1 = bi, featurize(x1[i0 : i0 + block])
                a = f1
                b = f1 if (sym and bi == bj) else featurize(x2_[j0 : j0 + block])
            tile = pair(a, b).to(dtype).cpu().numpy()
            if sym and bi == bj:  # BLAS does not promise a @ a.T symmetric to the last bit: mirror the upper triangle
                iu = np.triu_indices(tile.shape[0], 1)
                tile[(iu[1], iu[0])] = tile[iu]
            target[i0 : i0 + tile.shape[0], j0 : j0 + tile.shape[1]] = tile
            if sym and bi != bj:
                target[j0 : j0 + tile.shape[1], i0 : i0 + tile.shape[0]] = tile.T
            bar.update(1)
            if log is not None:
                log(done)
            if checkpoint is not None:
                checkpoint(done, final=done == len(mine))
    bar.close()
    if K is not None and world > 1:
        torch.distributed.all_reduce(K, op=torch.distributed.ReduceOp.SUM)
    return K
