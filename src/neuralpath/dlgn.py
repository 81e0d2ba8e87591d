"""Instruments for the authors' deep linearly gated networks (arXiv 2110.03403, 2203.16455; ICLR 2025).

- :func:`gate_hyperplanes`: every gate's hyperplane in input space. With a linear gating network (DLGN) the
  pre-activation of unit i in layer l is exactly <n_i, x> + o_i with n = W_l ... W_1 (rows) and o the propagated
  bias, so each gate is a half-space test on x. DLGN-SF: n = V_l. For a ReLU gating network (the paper's DGN, the
  ReLU net) the same object exists only locally: inside the linear region of x, q_l = A_l(x) x + c_l(x), with A_l
  the product of the layers and the gate masks at x; pass ``x`` to get those local hyperplanes.
- :class:`DLGNVT`: the DLGN with a value *tensor*: one free parameter per path instead of products of layer
  weights (value input all ones), yhat(x) = sum_{i_1..i_{d-1}} V[i_1, ..., i_{d-1}] prod_l g_l(x)[i_l];
  its NPK is prod_l <g_l(x), g_l(x')>.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import jacrev, vmap

from .errors import NeuralpathError
from .gates import gate_fn
from .nets.base import DGN, Layers


def gate_hyperplanes(net: DGN, x: torch.Tensor | None = None):
    """Per gated layer: (normals, offsets) with q_l(x) = normals @ x_flat + offsets.

    Linear or shallow gating: exact everywhere, normals (units, d_in), offsets (units,); ``x`` is ignored.
    ReLU gating: ``x`` (n, ...) is required and the hyperplanes are those of x's linear region: normals
    (n, units, d_in), offsets (n, units). Units are flattened (channels x positions for conv layers)."""
    if not isinstance(net, DGN):
        raise NeuralpathError(f"gate_hyperplanes needs an FCDGN or ConvDGN, got {type(net).__name__}")
    p = next(net.parameters())
    shape = net.input_shape
    d_in = math.prod(shape)

    def qs(v):  # one flat input -> concatenated flat pre-activations of every gated layer
        return torch.cat([q.reshape(-1) for q in net.feature_forward(v.reshape(1, *shape))[0]])

    sizes = None
    with torch.enable_grad():
        if net.gating in ("linear", "shallow"):
            z = torch.zeros(d_in, dtype=p.dtype, device=p.device)
            J = jacrev(qs)(z)  # (units, d_in): the linear part, exact
            off = qs(z).detach()
            sizes = [q[0].numel() for q in net.feature_forward(z.reshape(1, *shape))[0]]
            return [(a.detach(), b) for a, b in zip(J.split(sizes), off.split(sizes))]
        if x is None:
            raise NeuralpathError(
                "a ReLU gating network has no global hyperplanes: pass x to get those of its "
                "linear region (gate_hyperplanes(net, x))"
            )
        xf = x.to(p.device, p.dtype).reshape(len(x), -1)
        J = vmap(jacrev(qs))(xf)  # (n, units, d_in)
        q = vmap(qs)(xf)
        off = q - torch.einsum("nud,nd->nu", J, xf)
        sizes = [t[0].numel() for t in net.feature_forward(xf[:1].reshape(1, *shape))[0]]
        return [(a.detach(), b.detach()) for a, b in zip(J.split(sizes, 1), off.split(sizes, 1))]


class DLGNVT(nn.Module):
    """DLGN with a value tensor (arXiv 2203.16455): a linear gating network (FC) and one parameter per path.

    in_dim -> (depth - 1) gated layers of ``width``; output scalar (or ``out_dim`` channels of the tensor)."""

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int = 1,
        beta: float = 10.0,
        gate: str = "soft",
        bias: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if depth < 2:
            raise NeuralpathError(f"depth={depth} must be >= 2")
        n_params = width ** (depth - 1) * out_dim
        if n_params > 50_000_000:
            raise NeuralpathError(f"the value tensor would hold {n_params:,} parameters; use fewer layers or units")
        self.in_dim, self.width, self.depth, self.out_dim = in_dim, width, depth, out_dim
        self.gate_kind, self.beta, self.eps, self.tied = gate, float(beta), 0.0, False
        self.gating, self.value_input, self.features_frozen = "linear", "ones", False
        self._gate = gate_fn(gate, beta, 0.0)
        dims = [in_dim] + [width] * (depth - 1)
        self.feature_layers = Layers([nn.Linear(dims[l], dims[l + 1], bias=bias) for l in range(depth - 1)])
        g = generator or torch.Generator().manual_seed(0)
        self.V = nn.Parameter(
            torch.randn((out_dim,) + (width,) * (depth - 1), generator=g) / math.sqrt(width ** (depth - 1))
        )
        with torch.no_grad():
            for layer in self.feature_layers:
                assert isinstance(layer, nn.Linear)
                layer.weight.normal_(0, 1 / math.sqrt(layer.in_features), generator=g)
                if layer.bias is not None:
                    layer.bias.zero_()

    def gates(self, x):
        z = x.reshape(len(x), -1)
        out = []
        for layer in self.feature_layers:
            z = layer(z)
            out.append(self._gate(z))
        return out

    def forward(self, x):
        t = self.V.unsqueeze(0).expand(len(x), *self.V.shape)  # (n, k, w, ..., w)
        for g in reversed(self.gates(x)):  # contract the last path index with the last gates
            t = (t * g.reshape(len(x), *([1] * (t.dim() - 2)), -1)).sum(-1)
        return t  # (n, k)

    def npk(self, x1, x2=None):
        """H(x, x') = prod_l <g_l(x), g_l(x')> (paths = one unit per gated layer; value input all ones); the same as
        ``neuralpath.npk(self, x1, x2)``, which computes it."""
        from .kernels.npk import npk

        return npk(self, x1, x2)

    def npf(self, x):
        """(n, w^(d-1)) explicit path features: the outer product of the layers' gates."""
        with torch.no_grad():
            phi = None
            for g in self.gates(x):
                phi = g if phi is None else (phi[:, :, None] * g[:, None, :]).reshape(len(x), -1)
        return phi

    def npv(self):
        return self.V.detach().reshape(self.out_dim, -1).T
