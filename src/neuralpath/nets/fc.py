"""Fully connected deep gated network (docs/THEORY.md §1, §3): in_dim -> (d-1) gated layers of `width` -> out_dim."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NeuralpathError, check_positive_int
from .base import DGN, Layers
from .base import describe_input as _what


class FCDGN(DGN):
    """Fully connected DGN of depth d = ``depth`` (d-1 gated hidden layers, then a linear output layer).

    Defaults follow the paper's FC-MNIST model: 784 -> 5 x 128 -> 10, Keras glorot-uniform weights, zero
    biases. ``tied=True`` is the standard ReLU network (one set of weights, hard gates). The authors' later models
    (arXiv 2110.03403): ``gating='linear'`` is the DLGN (a linear gating network), ``gating='shallow'`` the DLGN-SF
    (every layer's gates read x), ``value_input='ones'`` the piecewise-constant ("pwc") value network.
    """

    def __init__(
        self,
        in_dim: int = 784,
        width: int = 128,
        depth: int = 6,
        out_dim: int = 10,
        gate: str = "hard",
        beta: float = 4.0,
        eps: float = 0.1,
        bias: bool = True,
        tied: bool = False,
        init: str = "glorot",
        init_scale: float = math.sqrt(2.0),
        generator: torch.Generator | None = None,
        gating: str = "relu",
        value_input: str = "x",
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("width", width), ("out_dim", out_dim)):
            check_positive_int(name, v)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise NeuralpathError(f"depth={depth!r} must be an integer >= 2 (d-1 >= 1 gated hidden layers + output)")
        self._setup_gating(gate, beta, eps, tied, gating, value_input)
        self.in_dim, self.width, self.out_dim = in_dim, width, out_dim
        dims = [in_dim] + [width] * (depth - 1)
        self.value_layers = Layers(
            [nn.Linear(dims[l], dims[l + 1], bias=bias) for l in range(depth - 1)]
            + [nn.Linear(width, out_dim, bias=bias)]
        )
        if tied:
            self.feature_layers = Layers(list(self.value_layers[:-1]))  # the same modules
        else:
            fin = [in_dim] * (depth - 1) if gating == "shallow" else dims[:-1]  # DLGN-SF: every layer reads x
            self.feature_layers = Layers([nn.Linear(fin[l], dims[l + 1], bias=bias) for l in range(depth - 1)])
        self.transitions = ["none"] * depth
        self.reset_parameters(init, init_scale, generator)

    def config(self) -> dict:
        return dict(
            arch="fc",
            in_dim=self.in_dim,
            width=self.width,
            depth=self.depth,
            out_dim=self.out_dim,
            gate=self.gate_kind,
            beta=self.beta,
            eps=self.eps,
            bias=self.has_bias,
            tied=self.tied,
            gating=self.gating,
            value_input=self.value_input,
        )

    def _prepare(self, x):
        self._check_input(x)
        if x.dim() >= 2 and x.dim() != 2:
            x = x.flatten(1)  # (n, C, H, W) -> (n, C*H*W)
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise NeuralpathError(
                f"{_what(x)} does not match in_dim={self.in_dim}; "
                f"pass (n, {self.in_dim}) or image-shaped (n, C, H, W) with C*H*W = {self.in_dim}"
            )
        return x
