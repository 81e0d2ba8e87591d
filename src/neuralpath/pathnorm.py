"""Path norms from the NPV, without enumerating paths (docs/THEORY.md §9).

    ||v_k||_q^q = sum over paths p ending at output k of prod_{weight edges e in p} |w_e|^q

is one forward pass of the value network with every trainable weight replaced by |w|^q, every gate opened (a path
counts whether or not it is active), fixed coefficients replaced by 1 (they belong to the NPF: 1/(HW) of global
average pooling, 1/divisor of average pooling), max pools replaced by the sum over their window (every edge is a
path), and the all-ones input (bias units are constant-1 units already). For the FC/conv DGNs and for any model
from :func:`neuralpath.from_module`.

Uses: the bound |yhat_k(x)| <= sqrt(H(x, x)) ||v_k||_2 (Cauchy-Schwarz on yhat_k = <phi_x, v_k>, H the NPK), and
the ratio ||v||_2^2 / nu (nu = y^T H^-1 y is the squared norm of the smallest NPV that fits y with the given gates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import NeuralpathError
from .nets.base import DGN
from .nets.rules import rule, transition


def _abs_q(t: torch.Tensor, q) -> torch.Tensor:
    return t.detach().abs() ** q


@torch.no_grad()
def path_norm(net, q: float = 2.0, dtype=torch.float64):
    """(k,) tensor: ||v_k||_q^q for every output k (``q`` > 0)."""
    if not q > 0:
        raise NeuralpathError(f"q={q!r} must be positive")
    from .anynet import ModuleDGN

    if isinstance(net, ModuleDGN):
        return _module_path_norm(net, q, dtype)
    if not isinstance(net, DGN):
        raise NeuralpathError(f"path_norm needs an FCDGN, a ConvDGN or from_module(...), got {type(net).__name__}")
    shape = net.input_shape
    z = torch.ones((1, *shape), dtype=dtype)
    for l, layer in enumerate(net.value_layers):
        z = transition(net.transitions[l]).path_sum(z)  # a pool's 1/(HW) is a fixed NPF coefficient, not in v
        w = _abs_q(layer.weight, q).to(dtype)
        b = None if layer.bias is None else _abs_q(layer.bias, q).to(dtype)
        z = rule(layer).apply(layer, z, w, b)
    return z[0]


def _module_path_norm(dgn, q, dtype):
    from .anynet.npk import _adaptive_matrix

    vals = []
    mods = dict(dgn.value.named_modules())
    for op in dgn.ops:
        a = [vals[j] for j in op.args]
        k = op.kind
        if k == "input":
            z = torch.ones((1, *op.shape), dtype=dtype)
        elif k == "linear":
            m = mods[op.module]
            z = F.linear(a[0], _abs_q(m.weight, q).to(dtype), None if m.bias is None else _abs_q(m.bias, q).to(dtype))
        elif k == "conv":
            m = mods[op.module]
            z = F.conv2d(
                a[0],
                _abs_q(m.weight, q).to(dtype),
                None if m.bias is None else _abs_q(m.bias, q).to(dtype),
                m.stride,
                op.opts["padding"],
                m.dilation,
                m.groups,
            )
        elif k == "bn":
            m = mods[op.module]
            scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)) / torch.sqrt(
                m.running_var + m.eps
            )
            shift = (m.bias if m.bias is not None else torch.zeros_like(m.running_mean)) - scale * m.running_mean
            shp = (1, -1) + (1,) * (a[0].dim() - 2)
            z = a[0] * (scale.abs() ** q).to(dtype).reshape(shp) + (shift.abs() ** q).to(dtype).reshape(shp)
        elif k in ("gate", "identity"):
            z = a[0]
        elif k == "maxpool":  # every window edge is a path
            o = op.opts
            c, h, w = a[0].shape[1:]
            cols = F.unfold(a[0], o["kernel_size"], o["dilation"], o["padding"], o["stride"])
            z = cols.reshape(1, c, -1, cols.shape[-1]).sum(2).reshape(1, *op.shape)
        elif k == "avgpool":  # a fixed coefficient on each edge: 1 here
            if "adaptive" in op.opts:
                h, w = a[0].shape[-2:]
                ho, wo = op.shape[-2:]
                Ah = (_adaptive_matrix(h, ho, dtype, a[0].device) > 0).to(dtype)
                Aw = (_adaptive_matrix(w, wo, dtype, a[0].device) > 0).to(dtype)
                z = torch.einsum("hH,ncHW,wW->nchw", Ah, a[0], Aw)
            else:
                o = op.opts
                z = F.avg_pool2d(a[0], o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"], True, 1)
        elif k == "flatten":
            z = a[0].flatten(1)
        elif k == "add":
            z = a[0] + a[1]
        elif k == "cat":
            z = torch.cat(a, 1)
        else:  # pragma: no cover
            raise NeuralpathError(f"unknown op {k}")
        vals.append(z)
    return vals[-1].reshape(-1)


@torch.no_grad()
def output_bound(net, x, dtype=torch.float64):
    """(|yhat(x)| (n, k), bound sqrt(H(x, x)) ||v_k||_2 (n, k)): Cauchy-Schwarz on yhat_k = <phi_x, v_k>."""
    import copy

    from .kernels.npk import npk

    net64 = copy.deepcopy(net).to(dtype)
    x = x.to(dtype)
    out = net64(x).abs()
    h = npk(net64, x, diag=True)
    return out, torch.sqrt(h)[:, None] * torch.sqrt(path_norm(net64, 2.0, dtype))[None, :]
