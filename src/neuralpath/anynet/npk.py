"""The NPK of any supported model in closed form: propagate the pair signal (docs/THEORY.md §7).

For a pair (x, x') let T(u) = sum over paths p ending at unit u of phi_x(p) phi_x'(p). In topological order

    T(input i) = x(i) x'(i),   T(bias unit) = 1
    T(u) = Gpair(u) * sum_{edges e = (s -> u)} c_e^2 Epair(e) T(s)

with Gpair the product of the two inputs' gates at u, Epair that of their edge gates (max pooling), c_e the fixed
coefficient of an edge (1 on weight edges). H(x, x') = T(first output unit). Per op (a x b pairs at once):

| op | T_out from T_in |
|---|---|
| linear | sum_i T_in(i) (+1 with bias): the same for every output unit |
| conv (groups g) | sum over the group's input channels and the strided, dilated, zero-padded window (+1) |
| gate | G_x G_x' T_in |
| maxpool | T_in(c, a_x(c, p)) 1{a_x(c, p) = a_x'(c, p)} |
| avgpool | sum_{q in window(p)} T_in(c, q) / divisor(p)^2 |
| bn (eval) | T_in + 1 (the scale is a weight edge, the shift a bias unit) |
| flatten, identity | T_in |
| add | T_a + T_b (the two branches' paths are disjoint) |
| cat | the inputs' T side by side |

Layout: every pair tensor is units first, pairs last, (*unit_shape, A, B), so the per-position overlap GEMMs
(P, a, C) @ (P, C, b) write it directly and every elementwise pass runs over contiguous memory. T stays
channel-independent after a conv (groups = 1) or a linear layer until a gate makes it per-channel; a gate followed
by a channel sum is kept factored, so the sum over channels is one GEMM per position (sum_c G_x(c, p) G_x'(c, p),
the per-position overlap) instead of a C x H x W x a x b tensor. Average pooling is linear and acts per channel, so
it commutes with the channel sum: after a gate it waits, pending, until the next channel sum (the global pool of a
ResNet costs nothing per channel). Window sums (convolutions, pooling) are separable shifted strided adds. A
residual sum adds terms; the signal a convolution and its projection shortcut both read is summed over channels
once. Each signal carries its own exactly tracked log-scale (every linear/conv divides by its fan-in), so deep
nets do not overflow. Cost for a tile of a x b pairs: the overlap GEMMs O(a b sum_gates C H W) (one per factored
term: a residual stage sums a few), O(a b H W) per op otherwise, plus O(a b C H W) for each op that needs T per
channel (max pooling after a gate, batch norm right after a gate, concatenation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import NeuralpathError


def _pm(g):
    """Position-major contiguous copy (P, n, C) of per-input tensors (n, C, ...); (1, n, F) for flat units. Cheap
    from channels-last activations (contiguous runs of C)."""
    return g.unsqueeze(0) if g.dim() == 2 else g.flatten(2).permute(2, 0, 1).contiguous()


class Feat:
    """Per-input features of a block of n inputs: the input and every gate position-major, the max pools' arg-max
    indices, and a cache of the per-input gate products the factored terms need (computed once per block, reused
    by every tile the block meets)."""

    __slots__ = ("n", "x", "gates", "pools", "cache")

    def __init__(self, x, gates, pools):
        self.n, self.x, self.gates, self.pools, self.cache = len(x), _pm(x), [_pm(g) for g in gates], pools, {}

    def fac(self, key):
        """The product of the input (key ('x', ...)) or gates named by ``key`` (gate-op indices), (P, n, C)."""
        if len(key) == 1:
            return self.x if key[0] == "x" else self.gates[key[0]]
        v = self.cache.get(key)
        if v is None:
            v = self.cache[key] = self.fac(key[:-1]) * self.gates[key[-1]]
        return v


def _storage_users():
    """A function giving how many tensors (and storage objects) share a tensor's memory, or None when this PyTorch
    lacks the (private) counter: then :class:`Pool` hands out fresh tensors."""
    f = getattr(torch._C, "_storage_Use_Count", None)
    if f is None:  # pragma: no cover - other PyTorch versions
        return None
    try:
        t = torch.empty(4)
        v = t.view(2, 2)
        if f(t.untyped_storage()._cdata) != 3:  # t, v and the temporary storage object
            return None
        del v
        if f(t.untyped_storage()._cdata) != 2:
            return None
    except Exception:  # pragma: no cover
        return None
    return lambda x: f(x.untyped_storage()._cdata)


class Pool:
    """Pair-sized buffers reused by every tile of one kernel. A fresh pair-sized tensor costs its page faults here
    (a 256 MB one ~50-100 ms, several passes' worth; docs/PERFORMANCE.md), and glibc's heap does not keep a tile's
    freed blocks in a reusable order. A buffer is handed out as a view; it is free again once no tensor shares its
    memory (PyTorch's storage use count), so the pool never holds more than the peak of one tile. Buffers of another
    tile shape are kept for the two most recent tile shapes only (the last row and column of blocks differ)."""

    MIN_NUMEL = 1 << 18  # smaller tensors come fresh: their allocation costs nothing worth tracking
    KEEP = 2  # tile shapes whose buffers are kept

    def __init__(self):
        self.users = _storage_users()
        self.groups: dict = {}  # (A, B) -> {(shape, dtype, device): [tensors]}, most recent last
        self.bufs: dict = {}

    def start(self, A, B):
        self.bufs = self.groups.pop((A, B), None) or {}
        self.groups[(A, B)] = self.bufs
        while len(self.groups) > self.KEEP:
            del self.groups[next(iter(self.groups))]

    def take(self, shape, like):
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        shape = tuple(shape)
        if self.users is None or math.prod(shape) < self.MIN_NUMEL:
            return like.new_empty(shape)
        key = (shape, like.dtype, like.device)
        lst = self.bufs.setdefault(key, [])
        for t in lst:
            if self.users(t) <= 2:  # the pool's own tensor and the temporary storage object
                return t.view(shape)
        t = like.new_empty(shape)
        lst.append(t)
        return t.view(shape)


class Ctx:
    """The two feature blocks of a tile, its pair shape (A, B) (B = 1 for paired rows), whether it is paired, and
    the kernel's buffer pool."""

    __slots__ = ("f1", "f2", "A", "B", "paired", "pool")

    def __init__(self, f1, f2, paired, pool=None):
        self.f1, self.f2, self.paired = f1, f2, paired
        self.A, self.B = f1.n, 1 if paired else f2.n
        self.pool = pool if pool is not None else Pool()
        self.pool.start(self.A, self.B)

    def new(self, shape, like):
        """An uninitialised pair-sized tensor from the pool (a value consumed at once frees its buffer for the next)."""
        return self.pool.take(shape, like)


class Term:
    """One summand of a pair signal, laid out units first: (*unit_shape, A, B) for A x B pairs (B = 1 paired).

    Plain (``g is None``): ``t`` has one dim per unit dim plus (A, B), each unit dim full or 1 (broadcast).
    Factored: T(c, p) = t(p) G1(c, p) G2(c, p), with ``t`` (P or 1, A or 1, B or 1) over the positions p and
    ``g`` the key of the per-input factor G (:meth:`Feat.fac`: the input or a product of gates met since the term
    became channel-independent; per input, never per pair); ``post`` (or None) a channel-wise linear map on the
    positions applied afterwards (pending average pooling): (X, *src, A, B) -> (X, *unit_shape[1:], A, B); ``src``
    the spatial shape of p; ``coef`` a scalar factor (residual sums align scales without a pass over t)."""

    __slots__ = ("t", "g", "post", "src", "coef")

    def __init__(self, t, g=None, post=None, src=(), coef=1.0):
        self.t, self.g, self.post, self.src, self.coef = t, g, post, tuple(src), coef


class Sig:
    """T = exp(ls) * sum of terms, for units of shape ``shape`` (a residual sum adds terms instead of
    materialising a per-channel tensor; each factored term's channel sum is one GEMM per position)."""

    def __init__(self, terms, ls, shape):
        self.terms, self.ls, self.shape = list(terms), float(ls), tuple(shape)
        self.memo = {}


def _outer_pm(g1, g2, paired):
    """(P, a, C), (P, b, C) -> (C, P, a, b); paired (C, P, a, 1)."""
    u, v = g1.permute(2, 0, 1), g2.permute(2, 0, 1)
    return (u * v).unsqueeze(-1) if paired else u.unsqueeze(-1) * v.unsqueeze(-2)


def _term_full(term, shape, cx):
    """A term as a tensor broadcastable to (*shape, A, B); factored terms are materialised per channel."""
    if term.g is None:
        return term.t if term.coef == 1.0 else term.t * term.coef
    o = _outer_pm(cx.f1.fac(term.g), cx.f2.fac(term.g), cx.paired).mul_(term.t)  # (C, P, A, B)
    if term.coef != 1.0:
        o.mul_(term.coef)
    o = o.reshape(o.shape[0], *term.src, *o.shape[-2:])
    return term.post(o) if term.post is not None else o.reshape(*shape, *o.shape[-2:])


def _full(s: Sig, cx) -> torch.Tensor:
    """The signal as one dense (*shape, A, B) tensor (scaled by exp(-ls))."""
    out: torch.Tensor | None = None
    for term in s.terms:
        v = _term_full(term, s.shape, cx)
        out = cx.new((*s.shape, cx.A, cx.B), v).copy_(v) if out is None else out.add_(v)
    assert out is not None, "a signal has at least one term"
    return out


def _gate(s: Sig, gi, cx):
    """Multiply by the gates of both inputs (gate op ``gi``): channel-independent terms keep them factored."""
    terms = []
    spatial = s.shape[1:]
    for term in s.terms:
        if term.g is None and term.t.shape[0] == 1:
            t = term.t
            if any(d != 1 for d in t.shape[1:-2]):
                t = t.expand(1, *spatial, *t.shape[-2:])
            terms.append(Term(t.reshape(-1, *t.shape[-2:]), (gi,), src=spatial, coef=term.coef))
        elif term.g is not None and term.post is None:
            terms.append(Term(term.t, term.g + (gi,), src=term.src, coef=term.coef))
        else:  # a per-channel or pooled term: fold the gates in
            v = _term_full(term, s.shape, cx)
            o = _outer_pm(cx.f1.gates[gi], cx.f2.gates[gi], cx.paired).reshape(*s.shape, cx.A, cx.B)
            terms.append(Term(o.mul_(v)))
    return Sig(terms, s.ls, s.shape)


def _chsum(s: Sig, groups, cx) -> torch.Tensor:
    """Sum over the channel dim (dim 0 of the units) within ``groups``: (groups, *shape[1:], A, B); memoised per
    signal (a residual stage's convolution and its projection shortcut read the same signal)."""
    if groups in s.memo:
        return s.memo[groups]
    c, rest = s.shape[0], s.shape[1:]
    full = (groups, *rest, cx.A, cx.B)
    out = None
    for term in sorted(s.terms, key=lambda r: r.g is None):  # factored terms first: out is full-size at once
        t = term.t
        if term.g is not None:
            g1, g2 = cx.f1.fac(term.g), cx.f2.fac(term.g)
            P = g1.shape[0]
            if groups == 1 and not cx.paired:  # sum_c G1(c, p) G2(c, p): one GEMM per position
                if out is not None and term.post is None:  # fused: out += coef * t * overlap, no new tensor
                    ov = torch.bmm(g1, g2.transpose(1, 2), out=cx.new((P, cx.A, cx.B), g1))
                    out.view(P, cx.A, cx.B).addcmul_(ov, t, value=term.coef)
                    continue
                buf = cx.new((P, cx.A, cx.B), g1)  # beta = 0 ignores it as input; the coefficient rides in alpha
                ov = torch.baddbmm(buf, g1, g2.transpose(1, 2), beta=0.0, alpha=term.coef, out=buf).unsqueeze(0)
                v = ov.mul_(t)
                v = v.reshape(v.shape[0], *term.src, *v.shape[-2:])
                if term.post is not None:
                    v = term.post(v)
                v = v.reshape(v.shape[0], *rest, *v.shape[-2:])
                out = _acc(out, v, full, cx)
                continue
            elif groups == 1:
                ov = (g1 * g2).sum(-1, keepdim=True).unsqueeze(0)
            else:
                a, b = g1.shape[1], g2.shape[1]
                u = g1.reshape(P, a, groups, c // groups)
                w = g2.reshape(P, b, groups, c // groups)
                if cx.paired:
                    ov = (u * w).sum(-1).permute(2, 0, 1).unsqueeze(-1)
                else:
                    ov = torch.einsum("pagc,pbgc->gpab", u, w)
            v = ov.mul_(t)
            if term.coef != 1.0:
                v.mul_(term.coef)
            v = v.reshape(v.shape[0], *term.src, *v.shape[-2:])
            if term.post is not None:
                v = term.post(v)
            v = v.reshape(v.shape[0], *rest, *v.shape[-2:])
        elif t.shape[0] == 1:  # channel-independent: the sum is C/groups times the value
            v = t * (term.coef * (c // groups))
        else:
            v = t.reshape(groups, c // groups, *t.shape[1:]).sum(1)
            if term.coef != 1.0:
                v.mul_(term.coef)
        out = _acc(out, v, full, cx)
    assert out is not None, "a signal has at least one term"
    s.memo[groups] = out
    return out


def _acc(out, v, full, cx):
    """out + v into a full-size tensor of its own (v is fresh: taken as out when it is full-size)."""
    if out is None:
        return v if tuple(v.shape) == full else cx.new(full, v).copy_(v.expand(full))
    return out.add_(v)


def _box(v, k, stride, pad, dil, out_hw, cx=None, bias=0.0):
    """Window sums with zero padding over the two spatial dims of v (X, H, W, A, B), plus ``bias``: for every output
    position, the sum of the inputs its (dilated, strided) window reads. Separable: one shifted strided add per tap
    and axis, a tap that covers every output first (a copy instead of zeros and an add; the bias rides in the second
    axis's first pass)."""
    for ax in (1, 2):
        n_in, n_out = v.shape[ax], out_hw[ax - 1]
        s, p, d = stride[ax - 1], pad[ax - 1], dil[ax - 1]
        taps = []
        for j in range(k[ax - 1]):
            off = j * d - p  # output i reads input i*s + off
            lo = -(off // s) if off < 0 else 0
            hi = min(n_out - 1, (n_in - 1 - off) // s)
            if lo <= hi:
                taps.append((lo, hi, off))
        taps.sort(key=lambda r: (r[0] != 0 or r[1] != n_out - 1))
        shp = list(v.shape)
        shp[ax] = n_out
        out = v.new_empty(shp) if cx is None else cx.new(shp, v)  # a pooled buffer is free again once consumed
        b = bias if ax == 2 else 0.0
        if not taps or taps[0][:2] != (0, n_out - 1):
            out.fill_(b)
        for i, (lo, hi, off) in enumerate(taps):
            idx = [slice(None)] * v.dim()
            idx[ax] = slice(lo * s + off, hi * s + off + 1, s)
            if i == 0 and (lo, hi) == (0, n_out - 1):
                if b:
                    torch.add(v[tuple(idx)], b, out=out)
                else:
                    out.copy_(v[tuple(idx)])
            else:
                out.narrow(ax, lo, hi - lo + 1).add_(v[tuple(idx)])
        v = out
    return v


def _align(sigs):
    """The terms of several signals on one common scale."""
    ls = max(s.ls for s in sigs)
    out = []
    for s in sigs:
        f = math.exp(s.ls - ls)
        out.append([Term(t.t, t.g, t.post, t.src, t.coef * f) for t in s.terms])
    return out, ls


def _window_divisors(op, h, w, dtype, device):
    """PyTorch's divisor of every average-pooling window (count_include_pad, ceil_mode, divisor_override)."""
    o = op.opts
    if o.get("divisor_override"):
        return None, float(o["divisor_override"])
    ones = torch.ones(1, 1, h, w, dtype=dtype, device=device)
    kw = dict(kernel_size=o["kernel_size"], stride=o["stride"], padding=o["padding"], ceil_mode=o["ceil_mode"])
    s = F.avg_pool2d(ones, count_include_pad=True, divisor_override=1, **kw)
    avg = F.avg_pool2d(ones, count_include_pad=o["count_include_pad"], **kw)
    return (s / avg)[0, 0], None


def _adaptive_matrix(n_in, n_out, dtype, device):
    """(n_out, n_in) matrix of adaptive average pooling along one axis: 1/|window| inside each window."""
    A = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i in range(n_out):
        s, e = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        A[i, s:e] = 1.0 / (e - s)
    return A


def _pool_post(op, h, w, dtype, device):
    """Average pooling as a channel-wise map on (X, H, W, A, B): the window sums of T divided by the squared
    divisor of each window (each path through the pool carries 1/divisor), PyTorch's divisors."""
    ho, wo = op.shape[-2:]
    if "adaptive" in op.opts:
        Ah = _adaptive_matrix(h, ho, dtype, device) ** 2
        Aw = _adaptive_matrix(w, wo, dtype, device) ** 2
        return lambda v: torch.einsum("hH,xHWab,wW->xhwab", Ah, v, Aw)
    o = op.opts
    div_map, div = _window_divisors(op, h, w, dtype, device)
    scale = 1.0 / div**2 if div else (1.0 / torch.as_tensor(div_map) ** 2)[None, :, :, None, None]

    def post(v):
        return _box(v, o["kernel_size"], o["stride"], o["padding"], (1, 1), (ho, wo)).mul_(scale)

    return post


def propagate(dgn, f1, f2, paired: bool = False, pool: Pool | None = None) -> tuple[torch.Tensor, float]:
    """Scaled NPK block of a ModuleDGN: (H_tilde (a, b) or (a, 1) when paired, log_scale). ``pool``: the kernel's
    buffers, reused from tile to tile (:class:`Pool`)."""
    cx = Ctx(f1, f2, paired, pool)
    A, B = cx.A, cx.B
    dt, dev = f1.x.dtype, f1.x.device
    mods = dict(dgn.value.named_modules())
    sigs: list = []
    last = {j: i for i, op in enumerate(dgn.ops) for j in op.args}  # the last op reading each signal
    gi = pi = 0
    for i, op in enumerate(dgn.ops):
        k = op.kind
        ins = [sigs[j] for j in op.args]
        for j in op.args:  # free what no later op reads (a tile's pair tensors are the memory of the NPK)
            if last[j] == i:
                sigs[j] = None
        if k == "input":  # x(i) x'(i): a factored term with t = 1
            src = op.shape[1:] if len(op.shape) > 1 else ()
            s = Sig([Term(torch.ones(1, 1, 1, dtype=dt, device=dev), ("x",), src=src)], 0.0, op.shape)
        elif k == "gate":
            s = _gate(ins[0], gi, cx)
            gi += 1
        elif k in ("conv", "linear"):
            m = mods[op.module]
            a = ins[0]
            if k == "conv":  # T = box(S) / fan (+ e^-ls): the 1/fan stays a term coefficient, the bias rides in the box
                groups = m.groups
                S = _chsum(a, groups, cx)  # (groups, H, W, A, B)
                fan = (m.in_channels // groups) * m.kernel_size[0] * m.kernel_size[1]
                ls = a.ls + math.log(fan)
                bias = fan * math.exp(-ls) if m.bias is not None else 0.0
                t = _box(S, m.kernel_size, m.stride, op.opts["padding"], m.dilation, op.shape[1:], cx, bias)
                if groups > 1:
                    t = t.repeat_interleave(m.out_channels // groups, dim=0)
                sigs.append(Sig([Term(t, coef=1.0 / fan)], ls, op.shape))
                continue
            else:  # a dense layer acts on the last unit dim
                if len(a.shape) == 1:
                    t = _chsum(a, 1, cx).clone()
                else:
                    t = _full(a, cx).sum(len(a.shape) - 1, keepdim=True)
                fan = m.in_features
            t.div_(fan)
            ls = a.ls + math.log(fan)
            if m.bias is not None:
                t.add_(math.exp(-ls))
            s = Sig([Term(t)], ls, op.shape)
        elif k == "bn":  # T + 1 per unit: a constant term beside the others (the scale is a weight edge)
            a = ins[0]
            const = torch.full((1,) * (len(a.shape) + 2), math.exp(-a.ls), dtype=dt, device=dev)
            s = Sig(a.terms + [Term(const)], a.ls, op.shape)
        elif k == "maxpool":
            a = ins[0]
            C, h, w = a.shape
            T = _full(a, cx).reshape(C, h * w, A, B)
            i1 = f1.pools[pi].flatten(2).permute(1, 2, 0)  # (C, Po, a)
            i2 = f2.pools[pi].flatten(2).permute(1, 2, 0)
            pi += 1
            same = (i1 == i2).unsqueeze(-1) if paired else i1.unsqueeze(-1) == i2.unsqueeze(-2)  # route alike
            t = T.gather(1, i1.unsqueeze(-1).expand(*i1.shape, B)).mul_(same.to(dt))
            s = Sig([Term(t.reshape(*op.shape, A, B))], a.ls, op.shape)
        elif k == "avgpool":
            a = ins[0]
            post = _pool_post(op, a.shape[1], a.shape[2], dt, dev)
            terms = []
            for term in a.terms:
                if term.g is None:
                    t = term.t.expand(term.t.shape[0], *a.shape[1:], A, B)
                    terms.append(Term(post(t), coef=term.coef))
                elif term.post is None:  # stays factored: the pooling waits for the channel sum
                    terms.append(Term(term.t, term.g, post, term.src, term.coef))
                else:

                    def chained(v, f=term.post, p=post):
                        return p(f(v))

                    terms.append(Term(term.t, term.g, chained, term.src, term.coef))
            s = Sig(terms, a.ls, op.shape)
        elif k == "flatten":
            a = ins[0]
            if len(a.shape) == 1:
                s = a
            elif all(d == 1 for d in a.shape[1:]):  # (C, 1, 1) -> (C,): reshape each term
                terms = []
                for term in a.terms:
                    if term.g is None:
                        terms.append(Term(term.t.reshape(term.t.shape[0], *term.t.shape[-2:]), coef=term.coef))
                    else:

                        def flat_post(v, f=term.post):
                            v = f(v) if f is not None else v
                            return v.reshape(v.shape[0], *v.shape[-2:])

                        terms.append(Term(term.t, term.g, flat_post, term.src, term.coef))
                s = Sig(terms, a.ls, op.shape)
            else:
                s = Sig([Term(_full(a, cx).reshape(*op.shape, A, B))], a.ls, op.shape)
        elif k == "identity":
            s = ins[0]
        elif k == "add":  # the two branches' paths are disjoint: their terms add
            (u, v), ls = _align(ins)
            s = Sig(u + v, ls, op.shape)
        elif k == "cat":
            aligned, ls = _align(ins)
            parts = [_full(Sig(ts, ls, x.shape), cx) for ts, x in zip(aligned, ins)]
            s = Sig([Term(torch.cat(parts, 0))], ls, op.shape)
        else:  # pragma: no cover
            raise NeuralpathError(f"unknown op {k}")
        sigs.append(s)
    out = sigs[-1]
    T = None
    for term in out.terms:  # the first output unit
        v = _term_full(term, out.shape, cx)
        v = v.expand(*out.shape, A, B)[(0,) * len(out.shape)]
        T = v.clone() if T is None else T.add_(v)
    assert T is not None, "the output signal has at least one term"
    return T, out.ls


def featurize(dgn, x):
    """:class:`Feat` of a block: inputs, gates (position-major) and max-pool indices, on the network's device and
    dtype, without gradients. Images go through the model channels-last (their gates then turn position-major
    with contiguous runs of channels; the convolutions are faster here too)."""
    p = next(dgn.parameters())
    x = x.to(p.device, p.dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        g, pools = dgn.feature_state(x)
        return Feat(x, [t.detach() for t in g], pools)


def npk_module(
    dgn, x1, x2=None, *, diag=False, dtype=None, block=256, out=None, progress: bool | str = False, scaled=False
):
    """NPK of a ModuleDGN through the blocked Gram engine (or its diagonal, ``diag=True``). ``scaled=True`` returns
    H * exp(-s) for the network's fixed log-scale s (the same for every pair): ratios such as the cosine
    normalisation never overflow."""
    from ..kernels.gram import gram, tiling

    if dtype is not None and dtype != next(dgn.parameters()).dtype:
        import copy

        dgn = copy.deepcopy(dgn).to(dtype)
    dt = next(dgn.parameters()).dtype

    pool = Pool()

    def pair(a, b):
        t, ls = propagate(dgn, a, b, pool=pool)
        return t if scaled else _finish(t, ls, dt)

    if diag:
        with torch.no_grad():
            outs = []
            for i in range(0, len(x1), block):
                f = featurize(dgn, x1[i : i + block])
                t, ls = propagate(dgn, f, f, paired=True, pool=pool)
                outs.append((t[:, 0] if scaled else _finish(t[:, 0], ls, dt)).cpu())
            return torch.cat(outs)
    with torch.no_grad():  # bytes per input: its gates and input, and as much again for cached gate products
        units = sum(math.prod(op.shape) for op in dgn.ops if op.kind == "gate")
        per_input = 2 * (units + math.prod(x1.shape[1:])) * torch.empty((), dtype=dt).element_size()
        tiles = tiling(dgn, block=block, out=out, dtype=dt, progress=progress, kernel="npk", scaled=scaled)
        return gram(lambda x: featurize(dgn, x), pair, x1, x2, desc="NPK", feature_bytes_per_input=per_input, **tiles)


def _finish(t, ls, dt):
    v = t * math.exp(ls) if ls < 700 else t.double() * math.exp(ls)
    if not bool(torch.isfinite(v).all()):
        raise NeuralpathError(
            f"the NPK overflows {dt} (log-scale {ls:.1f}); use dtype=torch.float64 or " "normalize='cosine'"
        )
    return v.to(dt)


def overlaps_module(dgn, x1, x2=None):
    """Per ReLU/LeakyReLU of the model: (n1, n2) overlap sum_u G_x(u) G_x'(u)."""
    with torch.no_grad():
        g1 = dgn.gates(x1)
        g2 = g1 if x2 is None else dgn.gates(x2)
    return [a.flatten(1) @ b.flatten(1).T for a, b in zip(g1, g2)]
