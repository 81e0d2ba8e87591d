import pytest
import torch

import neuralpath as npx
from neuralpath.errors import NeuralpathError
from neuralpath.regimes import build_regime


def plain_relu(net, x):
    z = x.flatten(1) if isinstance(net, npx.FCDGN) else x
    for l, layer in enumerate(net.value_layers[:-1]):
        z = torch.relu(layer(net.transition(l, z)))
    return net.value_layers[-1](net.transition(net.depth - 1, z))


@pytest.mark.parametrize(
    "make",
    [
        lambda: npx.FCDGN(in_dim=20, width=16, depth=5, out_dim=4, tied=True),
        lambda: npx.ConvDGN("vconv", in_channels=2, out_dim=3, channels=(4, 5), hidden=(6,), image_size=6, tied=True),
        lambda: npx.ConvDGN("gconv", in_channels=2, out_dim=3, channels=(4, 5), hidden=(6,), image_size=6, tied=True),
    ],
)
def test_tied_equals_relu_network(make):
    torch.manual_seed(0)
    net = make().double()
    x = torch.randn(9, *((20,) if isinstance(net, npx.FCDGN) else (2, 6, 6)), dtype=torch.float64)
    assert torch.allclose(net(x), plain_relu(net, x), atol=1e-12, rtol=0)
    # the tied net shares one set of weights
    assert net.feature_layers[0] is net.value_layers[0]
    assert len(list(net.parameters())) == len(net.value_parameters())


def test_hard_gates_pass_no_gradient_soft_gates_do():
    torch.manual_seed(0)
    x = torch.randn(8, 10)
    for gate, expect in (("hard", False), ("soft", True)):
        net = npx.FCDGN(in_dim=10, width=8, depth=4, out_dim=3, gate=gate)
        net(x).sum().backward()
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.feature_parameters())
        assert got == expect
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.value_layers[-1].parameters())


def test_gates_shapes_and_values():
    net = npx.ConvDGN("gconv", in_channels=3, out_dim=10, channels=(4, 6), hidden=(5,), image_size=8, gate="soft")
    gs = net.gates(torch.rand(2, 3, 8, 8))
    assert [tuple(g.shape) for g in gs] == [(2, 4, 8, 8), (2, 6, 8, 8), (2, 5)]
    assert all(((g > 0) & (g < 1.1)).all() for g in gs)  # (1 + eps) * sigmoid in (0, 1.1)
    hard = npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2)
    for g in hard.gates(torch.randn(5, 4)):
        assert set(g.unique().tolist()) <= {0.0, 1.0}


def test_paper_conv_shapes_and_parameter_count():
    g = npx.ConvDGN("gconv", in_channels=3, out_dim=10, tied=True)
    assert sum(p.numel() for p in g.parameters()) == 361_546
    v = npx.ConvDGN("vconv", in_channels=3, out_dim=10, tied=True)
    assert v.value_layers[4].in_features == 32 * 32 * 128
    assert len(v.feature_layers) == 6 and len(v.value_layers) == 7
    out = g(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    untied = npx.ConvDGN("gconv", in_channels=3, out_dim=10)
    assert sum(p.numel() for p in untied.value_parameters()) == 361_546


def test_fc_accepts_image_shaped_input_and_rejects_wrong_width():
    net = npx.FCDGN()
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(NeuralpathError, match="in_dim=784"):
        net(torch.rand(3, 100))
    with pytest.raises(TypeError, match="dtype"):
        net(torch.rand(3, 784, dtype=torch.float64))
    with pytest.raises(NeuralpathError, match="width"):
        npx.FCDGN(width=0)
    with pytest.raises(NeuralpathError, match="depth"):
        npx.FCDGN(depth=1)
    with pytest.raises(ValueError, match="gate='bogus'"):
        npx.FCDGN(gate="bogus")
    with pytest.raises(ValueError, match="arch='x'"):
        npx.ConvDGN("x")


@pytest.mark.parametrize("init", ["glorot", "gaussian", "bernoulli"])
def test_initialisations(init):
    net = npx.FCDGN(in_dim=400, width=300, depth=3, out_dim=10, init=init, generator=torch.Generator().manual_seed(0))
    w = net.value_layers[1].weight
    if init == "glorot":
        a = (6 / (300 + 300)) ** 0.5
        assert w.abs().max() <= a and w.abs().max() > 0.95 * a
    else:
        sigma = 2**0.5 / 300**0.5
        assert abs(w.std().item() - sigma) / sigma < 0.02
        if init == "bernoulli":
            assert torch.allclose(w.abs(), torch.full_like(w, sigma))
    assert (net.value_layers[0].bias == 0).all()


def test_regime_wiring():
    kw = dict(in_shape=(1, 6, 6), out_dim=3, width=8, depth=4)
    relu, p = build_regime("relu", "fc", 0, **kw)
    assert relu.tied and relu.gate_kind == "hard" and len(p) == len(list(relu.parameters()))
    dl, p = build_regime("dlnpf", "fc", 0, **kw)
    assert dl.gate_kind == "soft" and len(p) == len(list(dl.parameters()))
    assert not torch.equal(dl.feature_layers[0].weight, dl.value_layers[0].weight)
    ii, p = build_regime("frnpf-ii", "fc", 0, **kw)
    assert ii.gate_kind == "hard" and {id(q) for q in p} == {id(q) for q in ii.value_parameters()}
    assert not any(q.requires_grad for q in ii.feature_parameters())
    assert not torch.equal(ii.feature_layers[0].weight, ii.value_layers[0].weight)
    di, p = build_regime("frnpf-di", "fc", 0, **kw)
    for f, v in zip(di.feature_layers, di.value_layers):
        assert torch.equal(f.weight, v.weight) and f.weight is not v.weight
    assert not any(q.requires_grad for q in di.feature_parameters())
    # FLNPF: hidden layers (weights and biases) of a trained ReLU net, frozen; value net fresh
    with torch.no_grad():
        for m in relu.value_layers:
            m.bias.add_(0.5)
    fl, p = build_regime("flnpf", "fc", 1, relu_state=relu.state_dict(), **kw)
    for l, f in enumerate(fl.feature_layers):
        assert torch.equal(f.weight, relu.value_layers[l].weight) and torch.equal(f.bias, relu.value_layers[l].bias)
    assert not torch.equal(fl.value_layers[0].weight, relu.value_layers[0].weight)
    assert not any(q.requires_grad for q in fl.feature_parameters())
    # frozen feature nets build no graph: gates carry no grad_fn
    assert all(g.grad_fn is None for g in fl.gates(torch.rand(2, 36)))
    with pytest.raises(NeuralpathError, match="relu-checkpoint"):
        build_regime("flnpf", "fc", 0, **kw)
    other = npx.FCDGN(in_dim=36, width=5, depth=4, out_dim=3, tied=True)
    with pytest.raises(NeuralpathError, match="do not match"):
        build_regime("flnpf", "fc", 0, relu_state=other.state_dict(), **kw)
    with pytest.raises(ValueError, match="regime='nope'"):
        build_regime("nope", "fc", 0, **kw)


def test_regimes_are_seeded():
    a, _ = build_regime("frnpf-ii", "fc", 3, in_shape=(1, 4, 4), out_dim=2, width=5, depth=3)
    b, _ = build_regime("frnpf-ii", "fc", 3, in_shape=(1, 4, 4), out_dim=2, width=5, depth=3)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb) if torch.is_tensor(pa) else pa == pb
