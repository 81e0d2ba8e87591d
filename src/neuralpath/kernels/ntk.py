"""The empirical neural tangent kernel of deep gated networks (docs/THEORY.md §4).

    K(x, x') = sum_k < d yhat_k(x) / d Theta, d yhat_k(x') / d Theta >      (traced over the k outputs)

neural-tangents averages over outputs where this module sums (``trace=True``); ``trace=False`` returns the
per-output (n1, n2, k, k) kernel. ``params`` picks Theta: 'value' (Theta^v, K^v), 'feature' (Theta^f, K^f: zero for
hard gates, whose derivative vanishes) or 'all' (K = K^v + K^f). For the tied ReLU network there is one set of
weights and the gates are hard, so 'value' and 'all' are its full NTK and 'feature' is zero.

Implementations (every one agrees with every other in the tests, float64, 1e-10 relative):

``structured`` (default). Given the gates, the value network is linear in each layer's weights, so
    K^v = sum_l (<a_l(x), a_l(x')> + beta) * sum_k <delta_l^k(x), delta_l^k(x')>          (dense layer l)
with a_l the layer's input and delta_l^k = d yhat_k / d(pre-gate output of layer l), obtained by one forward pass
and one batched backward sweep of k signals (transposed layers, no autograd). Convolutions use the per-example
weight gradient sum_{hw} delta(co, hw) patch(ci, kh, kw, hw) (patches by unfold). The feature part uses the same
form with the feature network's inputs and gamma_l = d yhat / d q^f_l. Cost for an n1 x n2 block: time
O((n1 + n2) k [FP]) for the signals plus O(n1 n2 k sum_l (fan_in_l + fan_out_l)) (dense) or
O(n1 n2 k P_l) (conv) for the contractions; memory O(b k sum_l width_l) per tile. Pick it always for FC and for
conv nets: it never materialises a full Jacobian.

``jacobian``. torch.func ``vmap(jacrev)`` per-example Jacobians, contracted: time N O [FP] + N^2 O^2 P. The
reference, and the method of any-network DGNs (``from_module``). The traced kernel runs through the blocked Gram
engine (tiles whose two blocks of Jacobians take at most 2 GiB; streams to ``out=``), so its memory is a tile's;
the per-output kernel (``trace=False``) holds all N O P Jacobian entries and is refused where they do not fit.

``vp``. NTK-vector products (torch.func vjp then jvp): J(x2)^T is formed by vjp on the n2 k output directions and
pushed through jvp at x1; time O(n2 k ([FP] + n1 [FP])), memory O(n2 k P). Useful when P is large and n small.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack, overload

import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ..errors import NeuralpathError, check_choice
from ..nets.base import DGN
from ..nets.rules import rule, transition
from ..precision import exact, kernel_dtype
from .gram import gram, tiling
from .npk import KernelOptions, _as_dtype, _check_inputs

if TYPE_CHECKING:
    from ..anynet.dgn import ModuleDGN

PARAMS = ("value", "feature", "all")
METHODS = ("structured", "jacobian", "vp")


# -- structured -------------------------------------------------------------------------------------------
def _signals(net: DGN, x, want_feature: bool):
    """Forward + batched backward sweep. Returns per layer (layer, input a_l, signals delta_l (n, k, *out)) for
    the value network, and the same for the feature network when want_feature."""
    z = net.value_in(net._prepare(x))
    n = z.shape[0]
    d = net.depth
    with torch.no_grad():
        qf, gates = net.feature_forward(x)
        # value forward, keeping each layer's input a_l and pre-gate output u_l
        a_v, u_v = [], []
        for l in range(d):
            a = net.transition(l, z)
            u = net.value_layers[l](a)
            a_v.append(a)
            u_v.append(u)
            if l < d - 1:
                z = gates[l] * u
        k = u_v[-1].shape[1]
        # delta_d = e_k: (n, k, k)
        delta = torch.eye(k, dtype=z.dtype, device=z.device).expand(n, k, k)
        deltas: list[Any] = [None] * d
        rhos: list[Any] = [None] * (d - 1)  # rho_l = d yhat / d z^v_l
        deltas[d - 1] = delta
        keep_rho = want_feature and net.gate_kind == "soft" and not net.tied  # the feature part needs rho_l
        for l in range(d - 1, 0, -1):
            layer = net.value_layers[l]
            flat = deltas[l].reshape(n * k, *deltas[l].shape[2:])
            g = rule(layer).adjoint(layer, flat, a_v[l].shape[1:])
            g = transition(net.transitions[l]).adjoint(g, u_v[l - 1].shape[1:])
            rho = g.reshape(n, k, *u_v[l - 1].shape[1:])  # a fresh tensor: may be overwritten
            gl = gates[l - 1]
            if gl.dim() == 4:  # match the channels-last signals (a mixed-layout product is ~3x slower)
                gl = gl.contiguous(memory_format=torch.channels_last)
            if keep_rho:
                rhos[l - 1] = rho
                deltas[l - 1] = gl[:, None] * rho
            else:
                deltas[l - 1] = rho.mul_(gl[:, None])
        value = [(net.value_layers[l], a_v[l], deltas[l]) for l in range(d)]
        feature = []
        if keep_rho:  # the feature network's part (soft, untied gates)
            x0 = net._prepare(x)
            zf = x0
            a_f = []
            for l in range(d - 1):
                a_f.append(net.transition(l, x0 if net.gating == "shallow" else zf))
                zf = torch.relu(qf[l]) if net.gating == "relu" else qf[l]
            gam: list[Any] = [None] * (d - 1)
            for l in range(d - 2, -1, -1):
                s = torch.sigmoid(net.beta * qf[l])
                dsig = (1 + net.eps) * net.beta * s * (1 - s)
                g = (u_v[l] * dsig)[:, None] * rhos[l]
                if l < d - 2 and net.gating != "shallow":  # DLGN-SF: no gating layer feeds another
                    nxt = net.feature_layers[l + 1]
                    flat = gam[l + 1].reshape(n * k, *gam[l + 1].shape[2:])
                    back = rule(nxt).adjoint(nxt, flat, a_f[l + 1].shape[1:])
                    back = transition(net.transitions[l + 1]).adjoint(back, qf[l].shape[1:])
                    mask = (qf[l] > 0).to(g.dtype) if net.gating == "relu" else torch.ones_like(qf[l])
                    g = g + mask[:, None] * back.reshape(n, k, *qf[l].shape[1:])
                gam[l] = g
            feature = [(net.feature_layers[l], a_f[l], gam[l]) for l in range(d - 1)]
    return value, feature


_CHUNK_BYTES = 1 << 30  # transient signal memory per featurisation chunk


def _featurize(net, x, params, biases=True):
    """Per-input NTK features of x, in chunks whose k backward signals take about _CHUNK_BYTES (a block of
    full-width conv inputs would otherwise hold k x units x block floats of signals at once)."""
    with torch.no_grad():
        units = sum(g[0].numel() for g in net.feature_forward(x[:1])[1]) + net.out_dim
    chunk = max(8, _CHUNK_BYTES // (3 * net.out_dim * units * x.element_size()))
    if len(x) <= chunk:
        return _featurize_chunk(net, x, params, biases)
    parts = [_featurize_chunk(net, x[i : i + chunk], params, biases) for i in range(0, len(x), chunk)]
    out = []
    for entries in zip(*parts):
        if entries[0][0] == "dense":
            out.append(("dense", torch.cat([e[1] for e in entries]), torch.cat([e[2] for e in entries]), entries[0][3]))
        else:  # conv weight parts are k-major (k, n, P)
            b = None if entries[0][2] is None else torch.cat([e[2] for e in entries])
            out.append(("conv", torch.cat([e[1] for e in entries], 1), b))
    return out


def _featurize_chunk(net, x, params, biases=True):
    value, feature = _signals(net, x, want_feature=params in ("feature", "all"))
    groups = []
    if params in ("value", "all"):
        groups += value
    if params in ("feature", "all"):
        groups += feature
    out = []
    for layer, a, delta in groups:
        gw, gb = rule(layer).weight_grads(layer, a, delta)
        if gw is None:  # dense: keep the factors, contract them pairwise
            out.append(("dense", a.reshape(a.shape[0], -1), delta, biases and layer.bias is not None))
        else:
            out.append(("conv", gw, gb if biases and layer.bias is not None else None))
    return out


def _pair_structured(f1, f2, trace: bool, diag: bool = False) -> Any:
    K = None
    for e1, e2 in zip(f1, f2):
        if diag:  # paired rows: (n,) diagonal
            if e1[0] == "dense":
                _, a1, d1, has_b = e1
                part = ((a1 * a1).sum(1) + (1.0 if has_b else 0.0)) * (d1 * d1).reshape(len(d1), -1).sum(1)
            else:  # conv: g (k, n, P), b (n, k, Co)
                _, g1, b1 = e1
                part = (g1 * g1).sum((0, 2)) + (0 if b1 is None else (b1 * b1).reshape(len(b1), -1).sum(1))
            K = part if K is None else K + part
            continue
        if e1[0] == "dense":
            _, a1, d1, has_b = e1
            _, a2, d2, _ = e2
            aa = a1 @ a2.T + (1.0 if has_b else 0.0)
            if trace:
                part = aa * (d1.reshape(d1.shape[0], -1) @ d2.reshape(d2.shape[0], -1).T)
            else:
                part = aa[:, :, None, None] * torch.einsum("aki,bji->abkj", d1, d2)
        else:  # conv: weight part k-major (k, n, P), bias part (n, k, Co)
            _, g1, b1 = e1
            _, g2, b2 = e2
            if trace:
                part = torch.bmm(g1, g2.transpose(1, 2)).sum(0)
                if b1 is not None:
                    part = part + b1.reshape(len(b1), -1) @ b2.reshape(len(b2), -1).T
            else:
                part = torch.einsum("kap,jbp->abkj", g1, g2)
                if b1 is not None:
                    part = part + torch.einsum("aki,bji->abkj", b1, b2)
        K = part if K is None else K + part
    return K


# -- torch.func references --------------------------------------------------------------------------------
def _param_dict(net: DGN, params, biases=True):
    names = {k: v for k, v in net.named_parameters() if biases or not k.endswith(".bias")}
    vp, fp = ("value.", "feature.") if not isinstance(net, DGN) else ("value_layers.", "feature_layers.")
    if net.tied:
        sel = {k: v for k, v in names.items()} if params in ("value", "all") else {}
    else:
        keep = {"value": (vp,), "feature": (fp,), "all": (vp, fp)}[params]
        sel = {k: v for k, v in names.items() if k.startswith(keep)}
    return {k: v.detach() for k, v in sel.items()}


def _fn(net):
    frozen = getattr(net, "features_frozen", False)

    def f(p, x):  # one example -> (k,)
        net.features_frozen = False  # the torch.func transforms must see through the feature network
        try:
            return functional_call(net, p, (x[None],))[0]
        finally:
            net.features_frozen = frozen

    return f


def _ntk_jacobian(net, x1, x2, params, trace, biases=True) -> Any:
    p = _param_dict(net, params, biases)
    f = _fn(net)
    j1 = vmap(jacrev(f), (None, 0))(p, x1)
    j2 = j1 if x2 is None else vmap(jacrev(f), (None, 0))(p, x2)
    K = None
    for name in p:
        a, b = j1[name].flatten(2), j2[name].flatten(2)  # (n, k, P_name)
        part = torch.einsum("akp,bjp->abkj", a, b)
        K = part if K is None else K + part
    return K


_JAC_TILE_BYTES = 2 << 30  # per-example Jacobians of one tile (both sides) in the blocked jacobian method


def _jacobian_features(net, p, x):
    """Per-example Jacobians of x as (n, k * P_name) per parameter (views of ``vmap(jacrev)``'s output)."""
    j = vmap(jacrev(_fn(net)), (None, 0))(p, x)
    return [j[name].detach().reshape(len(x), -1) for name in p]


def _pair_jacobian(f1, f2):
    """Traced NTK of two blocks of per-example Jacobians: sum over parameters and outputs of J(x) . J(x')."""
    K = None
    for a, b in zip(f1, f2):
        K = a @ b.T if K is None else K.addmm_(a, b.T)
    return K


def _jacobian_bytes(net, p):
    """(bytes of one input's Jacobians, k x P entries, and the bytes of one entry) for the parameters p."""
    itemsize = next(iter(p.values())).element_size() if p else 4
    return net.out_dim * sum(v.numel() for v in p.values()) * itemsize, itemsize


def _jacobian_block(net, p, block):
    """(rows per tile, bytes of one input's Jacobians) of the blocked jacobian method: the tile's two blocks of
    per-example Jacobians (k x P floats each) within _JAC_TILE_BYTES, and at least one row. Refuses, before any work,
    a network whose one-input Jacobians (with the transforms' own copy) do not fit in the available memory."""
    from .gram import _avail_memory

    per_input, itemsize = _jacobian_bytes(net, p)
    avail = _avail_memory()
    if 6 * per_input > avail:
        raise NeuralpathError(
            f"the NTK by per-example Jacobians needs {per_input / 2**30:.2f} GiB per input ({net.out_dim} outputs x "
            f"{per_input // itemsize // net.out_dim:,} parameters) and about 6x that at once, more than the "
            f"{avail / 2**30:.1f} GiB available; pick fewer parameters (params='value' or 'feature') or a smaller model"
        )
    return max(1, min(block, _JAC_TILE_BYTES // (2 * per_input))), per_input


def _check_jacobian_memory(net, p, n, what):
    """Refuse, before any work, an in-memory Jacobian path (untraced or NTK-vector products) whose per-example
    Jacobians of n inputs would not fit."""
    from .gram import _avail_memory

    need = 2 * n * _jacobian_bytes(net, p)[0]
    avail = _avail_memory()
    if need > avail // 2:
        raise NeuralpathError(
            f"{what} of {n:,} inputs holds their Jacobians at once, about {need / 2**30:.1f} GiB, more than half "
            f"of the {avail / 2**30:.1f} GiB available; compute the traced kernel (trace=True: blocked), fewer inputs "
            "per call, or fewer parameters"
        )


def _ntk_vp(net, x1, x2, params, trace, biases=True):
    p = _param_dict(net, params, biases)
    f = _fn(net)
    x2_ = x1 if x2 is None else x2
    fb = lambda q: vmap(f, (None, 0))(q, x2_)  # noqa: E731  (n2, k)
    res = vjp(fb, p)
    out2, pullback = res[0], res[1]
    n2, k = out2.shape
    cot = torch.eye(n2 * k, dtype=out2.dtype, device=out2.device).reshape(n2 * k, n2, k)
    jt = vmap(pullback)(cot)[0]  # per output direction: a tangent in parameter space
    fa = lambda q: vmap(f, (None, 0))(q, x1)  # noqa: E731
    cols = vmap(lambda t: jvp(fa, (p,), (t,))[1])(jt)  # (n2*k, n1, k)
    return cols.reshape(n2, k, x1.shape[0], k).permute(2, 0, 3, 1)  # (n1, n2, k1, k2)


class NtkOptions(KernelOptions, total=False):
    """:func:`ntk`'s options: the contract's and which parameters, traced or per output, with or without biases."""

    params: str
    trace: bool
    biases: bool


@overload
def ntk(net: DGN | ModuleDGN, x1, x2=None, *, out: None = None, **options: Unpack[NtkOptions]) -> torch.Tensor: ...


@overload
def ntk(net: DGN | ModuleDGN, x1, x2=None, *, out: str | Path, **options: Unpack[NtkOptions]) -> Path: ...


def ntk(
    net: Any,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    diag: bool = False,
    params: str = "value",
    method: str = "structured",
    trace: bool = True,
    biases: bool = True,
    dtype=None,
    block: int = 256,
    out=None,
    progress: bool | str = False,
) -> Any:
    """Empirical NTK of a DGN, (n1, n2) traced over outputs (trace=False: (n1, n2, k, k)).

    params: 'value' | 'feature' | 'all';  method: 'structured' | 'jacobian' | 'vp' (see the module docstring).
    biases=False: derivatives w.r.t. the weights only (the authors' NTK-split notebook), not the biases.
    The structured method runs through the blocked Gram engine (block, out=FILE.npy, progress).
    """
    check_choice("params", params, PARAMS)
    check_choice("method", method, METHODS)
    dtype = kernel_dtype(dtype)
    x1, x2 = _check_inputs(net, x1, x2)
    if diag:  # K(x_i, x_i) (traced): linear in n for the structured method, so the NTK can be cosine-normalised
        if x2 is not None or out is not None or not trace:
            raise NeuralpathError("diag=True takes x1 only and returns the traced diagonal in memory")
        if not len(x1):
            return torch.zeros(0, dtype=dtype or next(net.parameters()).dtype)
        if method == "structured" and isinstance(net, DGN):
            net_ = _as_dtype(net, dtype)
            p = next(net_.parameters())
            rows = []
            for i in range(0, len(x1), block):
                f = _featurize(net_, x1[i : i + block].to(p.device, p.dtype), params, biases)
                rows.append(_pair_structured(f, f, trace=True, diag=True).cpu())
            return torch.cat(rows)
        return torch.stack(
            [
                ntk(net, x1[i : i + 1], params=params, method=method, biases=biases, dtype=dtype)[0, 0]
                for i in range(len(x1))
            ]
        )
    net = _as_dtype(net, dtype)
    dt = next(net.parameters()).dtype
    dev = next(net.parameters()).device
    x1 = x1.to(dev, dt)
    x2 = None if x2 is None else x2.to(dev, dt)
    n2 = len(x1) if x2 is None else len(x2)
    if not len(x1) or not n2:  # no inputs: an empty kernel, as npk gives
        return torch.zeros((len(x1), n2) if trace else (len(x1), n2, net.out_dim, net.out_dim), dtype=dt)
    if params == "feature" and (net.tied or net.gate_kind == "hard"):
        k = net.out_dim
        n2 = len(x1) if x2 is None else len(x2)
        shape = (len(x1), n2) if trace else (len(x1), n2, k, k)
        return torch.zeros(shape, dtype=dt)  # hard gates: d G / d Theta^f = 0 exactly
    if method == "structured" and not isinstance(net, DGN):
        method = "jacobian"  # any-network DGNs: the torch.func reference (the structured sweep is for FC/conv DGNs)
    if method == "structured":
        if not trace:
            f1 = _featurize(net, x1, params, biases)
            f2 = f1 if x2 is None else _featurize(net, x2, params, biases)
            return _pair_structured(f1, f2, trace=False)
        one = _featurize(net, x1[:1], params, biases)  # what one input's features occupy: the Gram engine keeps
        per_input = sum(t.numel() * t.element_size() for e in one for t in e[1:3] if torch.is_tensor(t))  # all if fit
        what = dict(kernel="ntk", params=params, biases=biases)  # what a resumable stream is a stream of
        tiles = tiling(net, block=block, out=out, dtype=dt, progress=progress, **what)
        return gram(
            lambda x: _featurize(net, x, params, biases),
            lambda a, b: _pair_structured(a, b, True),
            x1,
            x2,
            desc="NTK",
            feature_bytes_per_input=per_input,
            **tiles,
        )
    if method == "jacobian" and trace:  # blocked through the Gram engine: memory per tile, streams to out=
        p = _param_dict(net, params, biases)
        blk, per_input = _jacobian_block(net, p, block)
        what = dict(kernel="ntk", params=params, biases=biases, method="jacobian")
        tiles = tiling(net, block=blk, out=out, dtype=dt, progress=progress, **what)
        return gram(
            lambda x: _jacobian_features(net, p, x),
            _pair_jacobian,
            x1,
            x2,
            desc="NTK",
            feature_bytes_per_input=per_input,
            **tiles,
        )
    if out is not None:
        raise NeuralpathError(
            f"out= streams the traced kernel (trace=True) of method 'structured' or 'jacobian', not {method!r}"
            + ("" if trace else " with trace=False")
        )
    _check_jacobian_memory(
        net,
        _param_dict(net, params, biases),
        len(x1) + (0 if x2 is None else len(x2)) if method == "jacobian" else n2,
        "the per-output NTK" if method == "jacobian" else "the NTK by NTK-vector products",
    )
    with exact():
        K = (_ntk_jacobian if method == "jacobian" else _ntk_vp)(net, x1, x2, params, trace, biases)
    return K.diagonal(dim1=2, dim2=3).sum(-1) if trace else K
