"""Convolutional deep gated networks of the paper (arXiv 2006.10529, experiments; docs/THEORY.md): VCONV and GCONV.

    x (n, C, H, W) -> [3x3 'same' conv, stride 1, gated] x len(channels)
                   -> flatten (vconv) | global average pooling (gconv)
                   -> [dense, gated] x len(hidden) -> dense out_dim
All hidden layers are gated: 6 for the paper's shape channels=(64, 64, 128, 128), hidden=(256, 256).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NeuralpathError, check_choice, check_positive_int
from .base import DGN, Layers
from .base import describe_input as _what

ARCHS = ("vconv", "gconv")


class ConvDGN(DGN):
    def __init__(
        self,
        arch: str = "gconv",
        in_channels: int = 3,
        out_dim: int = 10,
        gate: str = "hard",
        bias: bool = True,
        tied: bool = False,
        channels=(64, 64, 128, 128),
        hidden=(256, 256),
        image_size: int = 32,
        kernel_size: int = 3,
        beta: float = 4.0,
        eps: float = 0.1,
        init: str = "glorot",
        init_scale: float = math.sqrt(2.0),
        gating: str = "relu",
        value_input: str = "x",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        for name, v in (("in_channels", in_channels), ("out_dim", out_dim), ("image_size", image_size)):
            check_positive_int(name, v)
        channels, hidden = tuple(channels), tuple(hidden)
        if not channels:
            raise NeuralpathError("channels=() must name at least one convolution width")
        for v in channels + hidden:
            check_positive_int("channels/hidden entry", v)
        if kernel_size % 2 != 1:
            raise NeuralpathError(f"kernel_size={kernel_size} must be odd for 'same' padding")
        self._setup_gating(gate, beta, eps, tied, gating, value_input)
        self.arch, self.in_channels, self.out_dim = arch, in_channels, out_dim
        self.channels, self.hidden, self.image_size, self.kernel_size = channels, hidden, image_size, kernel_size

        def build(shallow=False):
            # shallow (DLGN-SF): every gating layer reads x itself (conv layers the image, dense layers its
            # flattened (vconv) or pooled (gconv) form)
            layers, c_in = [], in_channels
            for c in channels:
                layers.append(
                    nn.Conv2d(
                        in_channels if shallow else c_in, c, kernel_size, stride=1, padding=kernel_size // 2, bias=bias
                    )
                )
                c_in = c
            d_in = c_in * image_size * image_size if arch == "vconv" else c_in
            d_x = in_channels * image_size * image_size if arch == "vconv" else in_channels
            for h in hidden:
                layers.append(nn.Linear(d_x if shallow else d_in, h, bias=bias))
                d_in = h
            return layers, d_in

        layers, d_last = build()
        self.value_layers = Layers(layers + [nn.Linear(d_last, out_dim, bias=bias)])
        self.feature_layers = Layers(layers if tied else build(shallow=gating == "shallow")[0])
        n_conv = len(channels)
        self.transitions = ["none"] * (n_conv + len(hidden) + 1)
        self.transitions[n_conv] = "flatten" if arch == "vconv" else "gap"
        self.reset_parameters(init, init_scale, generator)

    def config(self) -> dict:
        return dict(
            arch=self.arch,
            in_channels=self.in_channels,
            out_dim=self.out_dim,
            gate=self.gate_kind,
            bias=self.has_bias,
            tied=self.tied,
            channels=list(self.channels),
            hidden=list(self.hidden),
            image_size=self.image_size,
            kernel_size=self.kernel_size,
            beta=self.beta,
            eps=self.eps,
            gating=self.gating,
            value_input=self.value_input,
        )

    @property
    def n_conv(self) -> int:
        return len(self.channels)

    def _prepare(self, x):
        self._check_input(x)
        c, s = self.in_channels, self.image_size
        if x.dim() == 2 and x.shape[1] == c * s * s:
            x = x.view(-1, c, s, s)  # (n, C*H*W) -> (n, C, H, W)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise NeuralpathError(
                f"{_what(x)} does not match the network's ({c}, {s}, {s}) " f"images; pass (n, {c}, {s}, {s})"
            )
        return x
