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

T stays channel-independent after a conv (groups = 1) or a linear layer until a gate makes it per-channel; a gate
followed by a channel sum is kept factored, so the sum over channels is one GEMM per position
(sum_c G_x(c, p) G_x'(c, p), the per-position overlap) instead of an a x b x C x H x W tensor. Each signal carries
its own exactly tracked log-scale (every linear/conv divides by its fan-in), so deep nets do not overflow.
Cost for a tile of a x b pairs: the overlap GEMMs O(a b sum_gates C H W), plus O(a b C H W) for each op that needs
T per channel (max pooling, batch norm right after a gate, residual sums, concatenation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import NeuralpathError


class Term:
    """t * G1 G2: t is (a, b, *unit_shape) with a size-1 channel dim when the term is channel-independent; g is None
    or the per-input products of every gate met since the term became channel-independent: (G1 (a, C, ...),
    G2 (b, C, ...), and their position-major copies (P, a, C), (P, b, C) for the overlap GEMMs)."""

    __slots__ = ("t", "g")

    def __init__(self, t, g=None):
        self.t, self.g = t, g


class Sig:
    """T = exp(ls) * sum of terms (the identity paths of a residual network add terms instead of materialising a
    per-channel tensor: each term's channel sum is one GEMM per position)."""

    def __init__(self, terms, ls, shape):
        self.terms, self.ls, self.shape = list(terms), float(ls), tuple(shape)


def _outer(u, v, paired):
    """(a, *s), (b, *s) -> (a, b, *s); paired (a == b, row i with row i): (a, 1, *s)."""
    return (u * v).unsqueeze(1) if paired else u.unsqueeze(1) * v.unsqueeze(0)


def _pm(g):
    """Position-major contiguous copy (P, n, C) of per-input gates (n, C, ...); (1, n, F) for flat units."""
    return g.unsqueeze(0) if g.dim() == 2 else g.flatten(2).permute(2, 0, 1).contiguous()


def _term_full(term, shape, paired):
    t = term.t
    if term.g is not None:
        t = t * _outer(term.g[0], term.g[1], paired)
    return t.expand(*t.shape[:2], *shape) if tuple(t.shape[2:]) != tuple(shape) else t


def _full(s: Sig, paired):
    """The signal as one dense (a, b, *shape) tensor (scaled by exp(-ls))."""
    out = None
    for term in s.terms:
        v = _term_full(term, s.shape, paired)
        out = v.clone() if out is None else out + v
    return out


def _dense(s: Sig, paired):
    return Sig([Term(_full(s, paired))], s.ls, s.shape)


def _gate(s: Sig, g1, g2, paired):
    """Multiply by the gates of both inputs: channel-independent terms keep them factored (per-input products)."""
    terms = []
    for term in s.terms:
        if term.t.dim() > 2 and term.t.shape[2] == 1 or term.t.dim() == 2:
            if term.g is None:
                terms.append(Term(term.t, (g1, g2, _pm(g1), _pm(g2))))
            else:
                G1, G2 = term.g[0] * g1, term.g[1] * g2
                terms.append(Term(term.t, (G1, G2, _pm(G1), _pm(G2))))
        else:  # a per-channel term: fold the gates in
            terms.append(Term(_term_full(term, s.shape, paired) * _outer(g1, g2, paired)))
    return Sig(terms, s.ls, s.shape)


def _chsum(s: Sig, groups, paired):
    """Sum over the channel dim (dim 0 of the unit shape) within ``groups``: (a, b, groups, *rest)."""
    c = s.shape[0]
    rest = s.shape[1:]
    out = None
    for term in s.terms:
        t = term.t
        if term.g is not None and groups == 1:
            p1, p2 = term.g[2], term.g[3]  # (P, a, C), (P, b, C)
            if paired:
                ov = (p1 * p2).sum(-1).permute(1, 0).reshape(p1.shape[1], 1, 1, *rest)
            else:  # sum_c G1(c, p) G2(c, p): one GEMM per position on contiguous operands
                ov = torch.bmm(p1, p2.transpose(1, 2)).permute(1, 2, 0).reshape(p1.shape[1], p2.shape[1], 1, *rest)
            v = t.reshape(*t.shape[:2], 1, *t.shape[3:]) * ov
        elif term.g is not None:  # grouped channels: the same sum per group (einsum)
            g1, g2 = term.g[0], term.g[1]
            a, b = g1.shape[0], g2.shape[0]
            g1 = g1.reshape(a, groups, c // groups, -1)
            g2 = g2.reshape(b, groups, c // groups, -1)
            ov = (g1 * g2).sum(2)[:, None] if paired else torch.einsum("agcp,bgcp->abgp", g1, g2)
            v = t.reshape(*t.shape[:2], 1, *t.shape[3:]) * ov.reshape(a, 1 if paired else b, groups, *rest)
        elif t.shape[2] == 1:  # channel-independent: the sum is C/groups times the value
            v = t.expand(*t.shape[:2], groups, *t.shape[3:]) * (c // groups)
        else:
            v = t.reshape(*t.shape[:2], groups, c // groups, *t.shape[3:]).sum(3)
        out = v if out is None else out + v
    return out


def _align(sigs):
    """The terms of several signals on one common scale."""
    ls = max(s.ls for s in sigs)
    out = []
    for s in sigs:
        f = math.exp(s.ls - ls)
        out.append([Term(t.t * f if f != 1.0 else t.t, t.g) for t in s.terms])
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


def propagate(dgn, f1, f2, paired: bool = False):
    """Scaled NPK block of a ModuleDGN: (H_tilde (a, b) or (a, 1) when paired, log_scale)."""
    (x1, g1s, p1s), (x2, g2s, p2s) = f1, f2
    ops = dgn.ops
    mods = dict(dgn.value.named_modules())
    sigs = []
    gi = pi = 0
    for op in ops:
        k = op.kind
        ins = [sigs[j] for j in op.args]
        if k == "input":
            s = Sig([Term(_outer(x1, x2, paired))], 0.0, op.shape)
        elif k == "gate":
            s = _gate(ins[0], g1s[gi], g2s[gi], paired)
            gi += 1
        elif k in ("conv", "linear"):
            m = mods[op.module]
            a = ins[0]
            if k == "conv":
                groups = m.groups
                S = _chsum(a, groups, paired)  # (a, b, g, H, W)
                A, B = S.shape[:2]
                h, w = S.shape[-2:]
                kh, kw = m.kernel_size
                ones = torch.ones(1, 1, kh, kw, dtype=S.dtype, device=S.device)
                box = F.conv2d(
                    S.reshape(A * B * groups, 1, h, w),
                    ones,
                    stride=m.stride,
                    padding=op.opts["padding"],
                    dilation=m.dilation,
                )
                fan = (m.in_channels // groups) * kh * kw
                t = box.reshape(A, B, groups, *box.shape[-2:]) / fan
                cout = m.out_channels
                if groups > 1:
                    t = t.repeat_interleave(cout // groups, dim=2)
            else:  # a dense layer acts on the last dim
                S = _chsum(a, 1, paired) if len(a.shape) == 1 else _full(a, paired).sum(-1, keepdim=True)
                fan = m.in_features
                t = S / fan
            ls = a.ls + math.log(fan)
            if m.bias is not None:
                t = t + math.exp(-ls)
            s = Sig([Term(t)], ls, op.shape)
        elif k == "bn":  # T + 1 per unit: a constant term beside the others (the scale is a weight edge)
            a = ins[0]
            const = torch.full((1, 1, 1, *a.shape[1:]), math.exp(-a.ls), dtype=x1.dtype, device=x1.device)
            s = Sig(a.terms + [Term(const)], a.ls, op.shape)
        elif k == "maxpool":
            a = ins[0]
            T = _full(a, paired)
            i1, i2 = p1s[pi], p2s[pi]
            pi += 1
            A, B, C = T.shape[:3]
            idx = i1.flatten(2).unsqueeze(1).expand(A, B, C, -1)
            same = (
                (i1 == i2).flatten(2).unsqueeze(1) if paired else (i1.unsqueeze(1) == i2.unsqueeze(0)).flatten(3)
            )  # the two inputs route alike
            t = T.flatten(3).gather(3, idx) * same.to(T.dtype)
            s = Sig([Term(t.reshape(A, B, *op.shape))], a.ls, op.shape)
        elif k == "avgpool":
            a = ins[0]
            T = _full(a, paired)
            A, B = T.shape[:2]
            c, h, w = T.shape[2:]
            if "adaptive" in op.opts:
                ho, wo = op.shape[-2:]
                Ah = _adaptive_matrix(h, ho, T.dtype, T.device) ** 2
                Aw = _adaptive_matrix(w, wo, T.dtype, T.device) ** 2
                t = torch.einsum("hH,abcHW,wW->abchw", Ah, T, Aw)
            else:
                o = op.opts
                summed = F.avg_pool2d(
                    T.reshape(A * B * c, 1, h, w), o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"], True, 1
                )
                div_map, div = _window_divisors(op, h, w, T.dtype, T.device)
                t = summed.reshape(A, B, c, *summed.shape[-2:]) / (div**2 if div else div_map**2)
            s = Sig([Term(t)], a.ls, op.shape)
        elif k == "flatten":
            a = ins[0]
            if (
                all(term.g is None and term.t.dim() > 2 and term.t.shape[2] == 1 for term in a.terms)
                and len(a.shape) > 1
                and all(d == 1 for d in a.shape[1:])
            ):
                s = Sig([Term(term.t.reshape(*term.t.shape[:2], 1)) for term in a.terms], a.ls, op.shape)
            else:
                s = Sig([Term(_full(a, paired).flatten(2))], a.ls, op.shape)
        elif k == "identity":
            s = ins[0]
        elif k == "add":  # the two branches' paths are disjoint: their terms add
            (u, v), ls = _align(ins)
            s = Sig(u + v, ls, op.shape)
        elif k == "cat":
            aligned, ls = _align(ins)
            parts = [_full(Sig(ts, ls, x.shape), paired) for ts, x in zip(aligned, ins)]
            s = Sig([Term(torch.cat(parts, 2))], ls, op.shape)
        else:  # pragma: no cover
            raise NeuralpathError(f"unknown op {k}")
        sigs.append(s)
    T = _full(sigs[-1], paired)
    return T.reshape(*T.shape[:2], -1)[:, :, 0], sigs[-1].ls


def featurize(dgn, x):
    """(inputs, gates, max-pool indices) of a block, on the network's device and dtype, without gradients."""
    p = next(dgn.parameters())
    x = x.to(p.device, p.dtype)
    with torch.no_grad():
        g, pools = dgn.feature_state(x)
    return x, [t.detach() for t in g], pools


def npk_module(dgn, x1, x2=None, *, diag=False, dtype=None, block=256, out=None, progress=False, scaled=False):
    """NPK of a ModuleDGN through the blocked Gram engine (or its diagonal, ``diag=True``). ``scaled=True`` returns
    H * exp(-s) for the network's fixed log-scale s (the same for every pair): ratios such as the cosine
    normalisation never overflow."""
    from ..kernels.gram import gram

    if dtype is not None and dtype != next(dgn.parameters()).dtype:
        import copy

        dgn = copy.deepcopy(dgn).to(dtype)
    dt = next(dgn.parameters()).dtype

    def pair(a, b):
        t, ls = propagate(dgn, a, b)
        return t if scaled else _finish(t, ls, dt)

    if diag:
        with torch.no_grad():
            outs = []
            for i in range(0, len(x1), block):
                f = featurize(dgn, x1[i : i + block])
                t, ls = propagate(dgn, f, f, paired=True)
                outs.append((t[:, 0] if scaled else _finish(t[:, 0], ls, dt)).cpu())
            return torch.cat(outs)
    with torch.no_grad():
        return gram(
            lambda x: featurize(dgn, x), pair, x1, x2, block=block, out=out, dtype=dt, progress=progress, desc="NPK"
        )


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
