"""Explicit neural path features and values: the ground truth for small networks (docs/THEORY.md §1).

A path picks one unit per layer, from an input coordinate (or a constant-1 bias unit of any layer) to the last
hidden layer, along edges that exist in the network (every pair for dense layers; the k x k receptive field for
convolutions, so weights are shared between paths). With n inputs and k outputs:

    phi_x(p) = x(I_0(p)) * c(p) * A(x, p),   A(x, p) = prod_l G_x(I_l(p), l)    (npf: (n, P))
    v(p, k)  = product of the trainable weights on p, the last one into output k  (npv: (P, k))
    yhat(x)  = phi_x @ v

c(p) is the product of fixed, non-trainable coefficients on p: 1 for dense and conv edges, 1/(HW) for the edge
through a global average pool. Paths starting at a bias unit have x(I_0) replaced by 1 and start at that layer.
Path order: input paths, then bias paths of layer 1, 2, ..., d (the output bias, one path).
"""

from __future__ import annotations

import torch

from .errors import NeuralpathError
from .kernels.npk import _as_dtype, _check_inputs
from .nets.base import DGN
from .nets.rules import rule

MAX_ENTRIES = 50_000_000  # n * P (and P * k) entries refused above this; raise with npf(..., max_entries=...)


def _layer_matrices(net: DGN):
    """Per layer l = 1..d: (E, C, bias, in_shape, out_numel). E: trainable value on each edge (N_out, N_in);
    C: fixed coefficient on each edge (0 where there is no edge); bias: (N_out,) or None."""
    p = next(net.parameters())
    z = net._prepare(torch.zeros((1, *_input_shape(net)), dtype=p.dtype, device=p.device))
    mats = []
    with torch.no_grad():
        for l, layer in enumerate(net.value_layers):
            shape = tuple(z.shape[1:])
            n_in = z[0].numel()
            if n_in * n_in * 64 > 4 * MAX_ENTRIES:
                raise NeuralpathError(
                    f"layer {l + 1} has {n_in} input units: too large to unroll; npf/npv are for "
                    "small networks (use npk for the kernel)"
                )
            basis = torch.eye(n_in, dtype=p.dtype, device=p.device).reshape(n_in, *shape)
            tb = net.transition(l, basis)

            def op(w, layer=layer, tb=tb):
                return rule(layer).apply(layer, tb, w)

            J = op(layer.weight).reshape(n_in, -1).T  # C * E, (N_out, N_in)
            C = op(torch.ones_like(layer.weight)).reshape(n_in, -1).T
            E = torch.where(C != 0, J / torch.where(C != 0, C, torch.ones_like(C)), torch.zeros_like(J))
            out = layer(net.transition(l, z))
            b = None
            if layer.bias is not None:
                b = layer.bias.reshape(-1, *([1] * (out.dim() - 2))).expand(out.shape[1:]).reshape(-1)
            mats.append((E, C, b))
            z = out
    return mats


def _input_shape(net: DGN) -> tuple[int, ...]:
    return net.input_shape


def path_count(net: DGN) -> int:
    """Number of paths P (input paths plus bias paths), counted without enumerating them."""
    mats = _layer_matrices(net)
    c = torch.ones(mats[0][1].shape[1], dtype=torch.float64)
    for _, C, b in mats[:-1]:
        c = (C != 0).double() @ c + (1.0 if b is not None else 0.0)
    return int(round(c.sum().item())) + (1 if mats[-1][2] is not None else 0)


def _enumerate(net: DGN, x, max_entries: int):
    mats = _layer_matrices(net)
    n = 0 if x is None else len(x)
    P = path_count(net)
    if max(n, 1) * P > max_entries or P * mats[-1][0].shape[0] > max_entries:
        raise NeuralpathError(
            f"the network has {P:,} paths: npf/npv would hold {max(n, 1) * P:,} entries "
            f"(limit {max_entries:,}); use a smaller network, fewer inputs, or npk for the kernel"
        )
    p = next(net.parameters())
    if x is not None:
        xin = net.value_in(net._prepare(x.to(p.device, p.dtype))).reshape(n, -1)
        gates = [g.reshape(n, -1) for g in net.gates(x.to(p.device, p.dtype))]
    else:
        xin, gates = None, []
    n_in = mats[0][1].shape[1]
    end = torch.arange(n_in, device=p.device)
    val = torch.ones(n_in, dtype=p.dtype, device=p.device)
    feat = xin.clone() if xin is not None else None
    d = len(mats)
    for l in range(d - 1):
        E, C, b = mats[l]
        o_idx, i_idx = torch.nonzero(C != 0, as_tuple=True)  # edges (out, in), sorted by out
        order = torch.argsort(i_idx, stable=True)
        o_idx, i_idx = o_idx[order], i_idx[order]  # now grouped by their input unit
        counts = torch.bincount(i_idx, minlength=C.shape[1])
        starts = torch.cumsum(counts, 0) - counts
        rep = counts[end]  # edges leaving each path's end unit
        pidx = torch.repeat_interleave(torch.arange(len(end), device=end.device), rep)
        offs = torch.arange(int(rep.sum()), device=end.device) - torch.repeat_interleave(
            torch.cumsum(rep, 0) - rep, rep
        )
        eidx = starts[end][pidx] + offs
        new_end = o_idx[eidx]
        src_end = i_idx[eidx]
        val = val[pidx] * E[new_end, src_end]
        if feat is not None:
            feat = feat[:, pidx] * C[new_end, src_end] * gates[l][:, new_end]
        end = new_end
        if b is not None:  # paths starting at this layer's bias units
            units = torch.arange(C.shape[0], device=end.device)
            val = torch.cat([val, b])
            if feat is not None:
                feat = torch.cat([feat, gates[l]], dim=1)
            end = torch.cat([end, units])
    E, C, b = mats[-1]
    if not torch.allclose(C, C[:1].expand_as(C)):
        raise NeuralpathError("output-layer coefficients differ between outputs; npf cannot share features")
    values = val[:, None] * E[:, end].T  # (P, k)
    if feat is not None:
        feat = feat * C[0, end]
    if b is not None:  # the output bias: one path, feature 1
        values = torch.cat([values, b[None, :]], dim=0)
        if feat is not None:
            feat = torch.cat([feat, torch.ones((n, 1), dtype=feat.dtype, device=feat.device)], dim=1)
    return feat, values


@torch.no_grad()
def npf(net: DGN, x, *, dtype=None, max_entries: int = MAX_ENTRIES) -> torch.Tensor:
    """Explicit neural path features phi_x, (n, P); refuses, with the path count, when P is too large."""
    from .anynet import ModuleDGN, npf_module

    x, _ = _check_inputs(net, x, None)  # a DGN or from_module(...); a finite tensor (NaN would give NaN features)
    if isinstance(net, ModuleDGN):
        return npf_module(_as_dtype(net, dtype), x)
    phi = _enumerate(_as_dtype(net, dtype), x, max_entries)[0]
    assert phi is not None
    return phi


@torch.no_grad()
def npv(net: DGN, *, dtype=None, max_entries: int = MAX_ENTRIES) -> torch.Tensor:
    """Explicit neural path values v, (P, out_dim), in the same path order as :func:`npf`."""
    from .anynet import ModuleDGN, npv_module

    if isinstance(net, ModuleDGN):
        return npv_module(_as_dtype(net, dtype))
    if not isinstance(net, DGN):
        raise TypeError(f"net must be an FCDGN, a ConvDGN or from_module(...), got {type(net).__name__}")
    return _enumerate(_as_dtype(net, dtype), None, max_entries)[1]
