"""Explicit path enumeration for small models: the independent ground truth for the module NPK.

The model is unrolled into scalar units and edges (docs/THEORY.md §7): each op's edges are read off by applying it
to basis inputs (with its weights, and with all-ones weights: an edge exists where the latter is non-zero, its
trainable value is the ratio), gates sit on units (ReLU, LeakyReLU) or on edges (max pooling: the edge PyTorch
routes through). Paths are then listed explicitly by dynamic programming over the ops, so the number of paths
(P, returned) must stay small: this is for checking, not for use at scale.

    phi_x(p) = x(start) * prod(fixed coefficients) * prod(gates on p)    (x(start) = 1 for a bias start)
    v(p, k)  = prod(trainable values on p) * W_last[k, end unit of p]    (the last op must be a Linear layer)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NeuralpathError

MAX_PATHS = 2_000_000


class _Paths:
    def __init__(self, unit, start, coef, val, gates):
        self.unit, self.start, self.coef, self.val, self.gates = unit, start, coef, val, gates

    def __len__(self):
        return len(self.unit)

    @staticmethod
    def cat(ps):
        L = max(p.gates.shape[1] for p in ps)
        g = [F.pad(p.gates, (0, L - p.gates.shape[1]), value=-1) for p in ps]
        return _Paths(
            torch.cat([p.unit for p in ps]),
            torch.cat([p.start for p in ps]),
            torch.cat([p.coef for p in ps]),
            torch.cat([p.val for p in ps]),
            torch.cat(g),
        )


def _join(paths: _Paths, src, dst, w, c, gid, n_units_in):
    """Extend every path ending at an edge's source unit by that edge."""
    order = torch.argsort(paths.unit, stable=True)
    cnt = torch.bincount(paths.unit, minlength=n_units_in)
    first = torch.cumsum(cnt, 0) - cnt
    ne = cnt[src]
    total = int(ne.sum())
    if total > MAX_PATHS:
        raise NeuralpathError(
            f"the model has more than {MAX_PATHS:,} paths: too many to enumerate; npf/npv are for "
            "small models (use npk, which never enumerates them)"
        )
    e = torch.repeat_interleave(torch.arange(len(src)), ne)
    within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(ne, 0) - ne, ne)
    p = order[first[src[e]] + within]
    g = paths.gates[p]
    if bool((gid >= 0).any()):
        g = torch.cat([g, gid[e][:, None]], 1)
    return _Paths(dst[e], paths.start[p], paths.coef[p] * c[e], paths.val[p] * w[e], g)


def _bias_paths(bias_per_unit, dtype):
    u = torch.arange(len(bias_per_unit))
    return _Paths(
        u,
        torch.full_like(u, -1),
        torch.ones(len(u), dtype=dtype),
        bias_per_unit.to(dtype),
        torch.empty(len(u), 0, dtype=torch.long),
    )


def _edges_from_op(apply, apply_ones, n_in, in_shape, dtype):
    """(src, dst, value, coef) of a linear op from its action on basis inputs."""
    basis = torch.eye(n_in, dtype=dtype).reshape(n_in, *in_shape)
    J = apply(basis).reshape(n_in, -1).T  # (N_out, N_in): value * coef on each edge
    C = apply_ones(basis).reshape(n_in, -1).T
    dst, src = torch.nonzero(C, as_tuple=True)
    return src, dst, J[dst, src] / C[dst, src], C[dst, src]


def enumerate_paths(dgn):
    """(paths ending at the input units of the last Linear, last linear module, gate-id layout) of a ModuleDGN."""
    ops = dgn.ops
    last = ops[-1]
    if last.kind != "linear":
        raise NeuralpathError(
            "npf/npv need a model whose last op is a Linear layer (the output units' paths then "
            "share everything but the last weight)"
        )
    if len(ops[last.args[0]].shape) != 1:
        raise NeuralpathError("npf/npv need the last Linear layer to read a flat vector (flatten before it)")
    mods = dict(dgn.value.named_modules())
    dt = next(dgn.parameters()).dtype
    sets = {}
    gate_offset, n_gates, pool_edges = {}, 0, {}

    def numel(shape):
        n = 1
        for s in shape:
            n *= s
        return n

    with torch.no_grad():
        for i, op in enumerate(ops[:-1]):
            k = op.kind
            n_out = numel(op.shape)
            if k == "input":
                u = torch.arange(n_out)
                sets[i] = _Paths(
                    u,
                    u.clone(),
                    torch.ones(n_out, dtype=dt),
                    torch.ones(n_out, dtype=dt),
                    torch.empty(n_out, 0, dtype=torch.long),
                )
                continue
            src_op = op.args[0]
            in_shape = ops[src_op].shape
            n_in = numel(in_shape)
            ones = lambda n: torch.ones(n, dtype=dt)  # noqa: E731
            none = lambda n: torch.full((n,), -1, dtype=torch.long)  # noqa: E731
            if k in ("linear", "conv"):
                m = mods[op.module]
                if k == "conv":

                    def conv_apply(b, w=m.weight):
                        return F.conv2d(b, w, None, m.stride, op.opts["padding"], m.dilation, m.groups)

                    apply = conv_apply

                    apply_ones = lambda b: apply(b, torch.ones_like(m.weight))  # noqa: E731
                else:

                    def linear_apply(b, w=m.weight):
                        return F.linear(b, w)

                    apply = linear_apply

                    apply_ones = lambda b: F.linear(b, torch.ones_like(m.weight))  # noqa: E731
                src, dst, w, c = _edges_from_op(apply, apply_ones, n_in, in_shape, dt)
                # the value is trainable: it goes to v; the fixed coefficient of a weight edge is 1
                new = [_join(sets[src_op], src, dst, w, torch.ones_like(w), none(len(src)), n_in)]
                if m.bias is not None:
                    b = m.bias.detach().to(dt)
                    # a conv's bias is per channel (the first per-example axis); a Linear's per output feature (the
                    # last axis: a Linear on (n, ..., d) acts at every leading position)
                    lead = (-1, *([1] * (len(op.shape) - 1))) if k == "conv" else (-1,)
                    per = b.reshape(lead).expand(op.shape).reshape(-1)
                    new.append(_bias_paths(per, dt))
                sets[i] = _Paths.cat(new)
            elif k == "bn":
                m = mods[op.module]
                a = (m.weight if m.weight is not None else torch.ones_like(m.running_var)) / torch.sqrt(
                    m.running_var + m.eps
                )
                b = (m.bias if m.bias is not None else torch.zeros_like(m.running_mean)) - a * m.running_mean
                shape_c = (-1, *([1] * (len(op.shape) - 1)))
                av = a.to(dt).reshape(shape_c).expand(op.shape).reshape(-1)
                bv = b.to(dt).reshape(shape_c).expand(op.shape).reshape(-1)
                u = torch.arange(n_out)
                sets[i] = _Paths.cat(
                    [_join(sets[src_op], u, u, av, ones(n_out), none(n_out), n_in), _bias_paths(bv, dt)]
                )
            elif k == "gate":
                u = torch.arange(n_out)
                gate_offset[i] = n_gates
                sets[i] = _join(sets[src_op], u, u, ones(n_out), ones(n_out), n_gates + u, n_in)
                n_gates += n_out
            elif k == "maxpool":
                _, apply_ones = None, None
                c_in, h, w_ = in_shape
                o = op.opts
                ho, wo = op.shape[-2:]
                src, dst = [], []
                for c in range(c_in):
                    for i_ in range(ho):
                        for j_ in range(wo):
                            for di in range(o["kernel_size"][0]):
                                for dj in range(o["kernel_size"][1]):
                                    r = i_ * o["stride"][0] - o["padding"][0] + di * o["dilation"][0]
                                    s_ = j_ * o["stride"][1] - o["padding"][1] + dj * o["dilation"][1]
                                    if 0 <= r < h and 0 <= s_ < w_:
                                        src.append((c * h + r) * w_ + s_)
                                        dst.append((c * ho + i_) * wo + j_)
                src, dst = torch.tensor(src), torch.tensor(dst)
                pool_edges[i] = (n_gates, src, dst)
                gid = n_gates + torch.arange(len(src))
                n_gates += len(src)
                sets[i] = _join(sets[src_op], src, dst, ones(len(src)), ones(len(src)), gid, n_in)
            elif k == "avgpool":
                if "adaptive" in op.opts:

                    def adaptive_apply(b, w=None):
                        return F.adaptive_avg_pool2d(b, op.opts["adaptive"])

                    apply = adaptive_apply

                else:

                    def pool_apply(b, w=None):
                        return F.avg_pool2d(b, **op.opts)

                    apply = pool_apply

                src, dst, _, c = _edges_from_op(apply, apply, n_in, in_shape, dt)
                sets[i] = _join(sets[src_op], src, dst, ones(len(src)), c, none(len(src)), n_in)
            elif k in ("flatten", "identity"):
                sets[i] = sets[src_op]
            elif k == "add":
                u = torch.arange(n_out)
                sets[i] = _Paths.cat(
                    [_join(sets[j], u, u, ones(n_out), ones(n_out), none(n_out), n_out) for j in op.args]
                )
            elif k == "cat":
                parts, off = [], 0
                rest = numel(op.shape[1:])
                for j in op.args:
                    n_j = numel(ops[j].shape)
                    u = torch.arange(n_j)
                    c_j = ops[j].shape[0]
                    dst = u + off * rest
                    parts.append(_join(sets[j], u, dst, ones(n_j), ones(n_j), none(n_j), n_j))
                    off += c_j
                sets[i] = _Paths.cat(parts)
    return sets[last.args[0]], mods[last.module], (gate_offset, pool_edges, n_gates)


def _gate_vector(dgn, x, layout):
    """Per input: every unit gate, then every max-pool edge gate, then a 1 (the padding index -1)."""
    gate_offset, pool_edges, n_gates = layout
    gates, pools = dgn.feature_state(x)
    n = len(x)
    G = torch.ones(n, n_gates + 1, dtype=x.dtype)
    for (_, off), g in zip(sorted(gate_offset.items()), gates):
        G[:, off : off + g[0].numel()] = g.reshape(n, -1).detach().to(x.dtype)
    for (i, (off, src, dst)), idx in zip(sorted(pool_edges.items()), pools):
        c, ho, wo = dgn.ops[i].shape
        h, w = dgn.ops[dgn.ops[i].args[0]].shape[1:]
        chan = dst // (ho * wo)
        chosen = idx.reshape(n, -1)[:, dst] + (chan * h * w)[None]  # the routed input unit of each edge's output
        G[:, off : off + len(src)] = (chosen == src[None]).to(x.dtype)
    return G


def npf_module(dgn, x):
    """(n, P) neural path features of a ModuleDGN (paths to the last Linear's inputs, then its bias path)."""
    paths, last, layout = enumerate_paths(dgn)
    p = next(dgn.parameters())
    x = x.to(p.dtype)
    with torch.no_grad():
        G = _gate_vector(dgn, x, layout)  # (n, NG + 1)
        xf = x.reshape(len(x), -1)
        base = torch.where(paths.start[None] >= 0, xf[:, paths.start.clamp_min(0)], torch.ones(1, dtype=x.dtype))
        phi = base * paths.coef[None]
        if paths.gates.shape[1]:
            phi = phi * G[:, paths.gates].prod(-1)
        if last.bias is not None:
            phi = torch.cat([phi, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return phi


def npv_module(dgn):
    """(P, k) neural path values in the order of :func:`npf_module`."""
    paths, last, _ = enumerate_paths(dgn)
    with torch.no_grad():
        W = last.weight.detach().to(paths.val.dtype)  # (k, units)
        v = paths.val[:, None] * W.T[paths.unit]
        if last.bias is not None:
            v = torch.cat([v, last.bias.detach().to(v.dtype)[None]], 0)
    return v
