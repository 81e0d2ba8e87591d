"""The rule table (nets/rules.py): every layer type a DGN kernel meets is in it, and anything else raises, naming
the layer, instead of being treated as dense."""

import pytest
import torch
from torch import nn

import neuralpath as npx
from neuralpath.errors import NeuralpathError
from neuralpath.nets import rules


class Scaled(nn.Linear):
    """A subclass with a different forward: must not inherit Linear's rule silently."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_unknown_layer_type_is_refused_by_every_kernel():
    net = npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2, tied=True)
    net.value_layers[1] = Scaled(3, 3)
    x = torch.rand(5, 4)
    from neuralpath.pathnorm import path_norm

    for fn in (lambda: npx.npk(net, x), lambda: npx.ntk(net, x), lambda: path_norm(net)):
        with pytest.raises(NeuralpathError, match="layer Scaled has no rule"):
            fn()


def test_unknown_transition_is_refused():
    net = npx.ConvDGN("gconv", in_channels=1, out_dim=2, channels=(2,), hidden=(), image_size=4, tied=True)
    net.transitions[1] = "maxpool"
    with pytest.raises(NeuralpathError, match="transition 'maxpool' has no rule"):
        net(torch.rand(2, 1, 4, 4))


def test_conv_adjoint_is_the_transpose_of_the_forward_map():
    """<W x, d> = <x, W^T d> for both adjoint routes (flipped forward convolution, conv_transpose2d)."""
    g = torch.Generator().manual_seed(0)
    for stride in (1, 2):
        conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, bias=False).double()
        x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
        y = conv(x)
        d = torch.rand(y.shape, generator=g, dtype=torch.float64)
        lhs = (y * d).sum()
        rhs = (x * rules.ConvRule.adjoint(conv, d, x.shape[1:])).sum()
        assert abs(lhs - rhs).item() <= 1e-12 * abs(lhs).item()
