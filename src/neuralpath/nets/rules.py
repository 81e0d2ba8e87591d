"""One rule table for the layers and transitions of the paper's deep gated networks (docs/THEORY.md §1, §4).

Every place that treats a layer of an :class:`~neuralpath.nets.base.DGN` by its type asks this table: the forward
map with given weights (path enumeration, path norms), the adjoint W^T (the structured NTK's backward sweep), the
per-example weight gradient (its contraction) and the all-ones aggregation of the closed-form NPK (a k x k box for a
convolution, the full fan-in for a dense layer). The transitions between layers (identity, flatten, global average
pooling) have their forward map, their adjoint and their path coefficient here too. A layer type or transition not
in the table raises, naming it; nothing is treated as dense by default.

Any-network models (``neuralpath.anynet``) have their own op table (``anynet/graph.py``), since they carry strides,
dilations, pooling and residual sums that these networks do not.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NeuralpathError


class DenseRule:
    kind = "dense"

    @staticmethod
    def apply(layer: nn.Linear, x, weight, bias=None):
        """The layer's map with ``weight`` (and ``bias``) in place of its own."""
        return F.linear(x, weight, bias)

    @staticmethod
    def adjoint(layer: nn.Linear, delta, in_shape=None):
        """W^T applied to delta (B, out): bias-free."""
        return delta @ layer.weight

    @staticmethod
    def weight_grads(layer: nn.Linear, a, delta):
        """Dense layers keep the factors (a, delta) and contract them pairwise: no per-example gradient formed."""
        return None, delta

    @staticmethod
    def window(layer: nn.Linear) -> int:
        return 1


class ConvRule:
    kind = "conv"

    @staticmethod
    def apply(layer: nn.Conv2d, x, weight, bias=None):
        return F.conv2d(x, weight, bias, layer.stride, cast(Any, layer.padding), layer.dilation, layer.groups)

    @staticmethod
    def adjoint(layer: nn.Conv2d, delta, in_shape=None):
        """W^T applied to delta (B, Co, H', W'), back to the layer's input shape ``in_shape`` (C, H, W) (needed
        only for strides > 1, where several input sizes give the same output size). A stride-1 convolution's
        adjoint is itself a convolution (kernel flipped, channels swapped, padding k - 1 - p); run as a forward
        convolution on channels-last signals it is ~1.7x faster on this CPU than conv_transpose2d
        (docs/PERFORMANCE.md, conv NTK)."""
        pad = layer.padding
        if layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1 and not isinstance(pad, str):
            kh, kw = layer.kernel_size
            w = layer.weight.flip(-1, -2).transpose(0, 1)
            d = delta.contiguous(memory_format=torch.channels_last)
            return F.conv2d(d, w, None, 1, (kh - 1 - pad[0], kw - 1 - pad[1]))
        if isinstance(pad, str):
            raise NeuralpathError(f"{layer}: string padding with stride > 1 has no adjoint rule here")
        extra = [0, 0]
        if in_shape is not None:
            for i in range(2):
                span = (delta.shape[2 + i] - 1) * layer.stride[i] - 2 * pad[i]
                extra[i] = in_shape[1 + i] - span - layer.dilation[i] * (layer.kernel_size[i] - 1) - 1
        return F.conv_transpose2d(
            delta, layer.weight, None, layer.stride, pad, tuple(extra), layer.groups, layer.dilation
        )

    @staticmethod
    def weight_grads(layer: nn.Conv2d, a, delta):
        """Per-example gradients G^k_x = D^k_x P_x^T: the signal map (Co x HW) times the input's patches
        (HW x Ci kh kw), one batched product per example with rows (k, Co). Returns (weight part (k, n, P), a
        k-major view, and bias part (n, k, Co))."""
        n, k = delta.shape[:2]
        patches = F.unfold(a, layer.kernel_size, padding=cast(Any, layer.padding), stride=layer.stride)
        d = delta.contiguous().flatten(3)  # (n, k, Co, HW)
        gw = torch.bmm(d.flatten(1, 2), patches.transpose(1, 2))  # (n, k Co, Ci kh kw)
        return gw.reshape(n, k, -1).transpose(0, 1), d.sum(-1)

    @staticmethod
    def window(layer: nn.Conv2d) -> int:
        k = layer.kernel_size[0]
        if layer.stride != (1, 1) or layer.padding != (k // 2, k // 2) or layer.kernel_size != (k, k):
            raise NeuralpathError(
                f"{layer}: the closed-form NPK of a DGN supports square stride-1 'same' convolutions only "
                "(other convolutions: build the model as an nn.Module and use neuralpath.from_module)"
            )
        return k


LAYERS: dict[type, Any] = {nn.Linear: DenseRule, nn.Conv2d: ConvRule}


def rule(layer) -> Any:
    """The rule of ``layer``'s type; anything not in :data:`LAYERS` raises, naming it."""
    r = LAYERS.get(type(layer))
    if r is None:
        names = ", ".join(t.__name__ for t in LAYERS)
        raise NeuralpathError(
            f"layer {type(layer).__name__} has no rule in a deep gated network (supported: {names}); "
            "for other layers build the model as an nn.Module and use neuralpath.from_module"
        )
    return r


class _Identity:
    @staticmethod
    def forward(z):
        return z

    @staticmethod
    def adjoint(g, shape):
        return g

    @staticmethod
    def path_sum(z):
        """The transition with its fixed path coefficients dropped (path norms count the weights only)."""
        return z


class _Flatten:
    @staticmethod
    def forward(z):
        return z.flatten(1)  # (n, C, H, W) -> (n, C*H*W)

    @staticmethod
    def adjoint(g, shape):
        return g.reshape(g.shape[0], *shape)

    path_sum = forward


class _GlobalAveragePool:
    @staticmethod
    def forward(z):
        return z.mean(dim=(2, 3))  # (n, C, H, W) -> (n, C)

    @staticmethod
    def adjoint(g, shape):
        """Written channels-last, the layout the conv adjoints run fastest in."""
        h, w = shape[-2], shape[-1]
        out = torch.empty((g.shape[0], *shape), dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
        return out.copy_((g / (h * w))[:, :, None, None].expand(g.shape[0], *shape))

    @staticmethod
    def path_sum(z):
        return z.sum((2, 3))  # the pool's 1/(HW) is a fixed coefficient of the NPF, not part of the NPV


TRANSITIONS: dict[str, Any] = {"none": _Identity, "flatten": _Flatten, "gap": _GlobalAveragePool}


def transition(kind: str) -> Any:
    r = TRANSITIONS.get(kind)
    if r is None:
        raise NeuralpathError(f"transition {kind!r} has no rule (supported: {', '.join(TRANSITIONS)})")
    return r
