"""The authors' later models: DLGN / DLGN-SF gating, value input all ones, hyperplanes, DLGN-VT, the tree sets."""

import numpy as np
import pytest
import torch

import neuralpath as npx
from neuralpath.datasets import trees
from neuralpath.dlgn import DLGNVT, gate_hyperplanes
from neuralpath.errors import NeuralpathError
from neuralpath.testing import KernelTestBase

F64 = torch.float64


def _nets():
    torch.manual_seed(0)
    out = []
    for gating in ("linear", "shallow", "relu"):
        for vin in ("x", "ones"):
            for gate in ("soft", "hard"):
                out.append(
                    npx.FCDGN(in_dim=5, width=4, depth=4, out_dim=3, gate=gate, gating=gating, value_input=vin).double()
                )
                out.append(
                    npx.ConvDGN(
                        "gconv",
                        in_channels=2,
                        out_dim=3,
                        channels=(2, 2),
                        hidden=(3,),
                        image_size=4,
                        gate=gate,
                        gating=gating,
                        value_input=vin,
                    ).double()
                )
    for n in out:
        for m in n.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.data.normal_(generator=torch.Generator().manual_seed(1))
    return out


def _x(net, n=6):
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(n, 5, dtype=F64, generator=g)
        if isinstance(net, npx.FCDGN)
        else torch.rand(n, 2, 4, 4, dtype=F64, generator=g)
    )


@pytest.mark.parametrize("net", _nets(), ids=lambda n: f"{type(n).__name__}-{n.gating}-{n.value_input}-{n.gate_kind}")
def test_path_algebra_and_ntk_of_every_gating(net):
    x = _x(net)
    phi, v = npx.npf(net, x), npx.npv(net)
    out = net(x).detach()
    assert ((phi @ v - out).abs().max() / out.abs().max()).item() <= 1e-10
    H = npx.npk(net, x)
    assert ((H - phi @ phi.T).abs().max() / H.abs().max()).item() <= 1e-10
    K = npx.ntk(net, x, params="all", trace=False)
    R = npx.ntk(net, x, params="all", method="jacobian", trace=False)
    assert ((K - R).abs().max() / R.abs().max()).item() <= 1e-10


@pytest.mark.parametrize("gating", ["linear", "shallow", "relu"])
def test_hyperplanes_reproduce_the_gates_exactly(gating):
    torch.manual_seed(3)
    net = npx.FCDGN(in_dim=6, width=5, depth=4, out_dim=1, gate="hard", gating=gating, value_input="ones").double()
    for m in net.modules():
        if getattr(m, "bias", None) is not None:
            m.bias.data.normal_()
    x = torch.randn(200, 6, dtype=F64)
    for (normals, offsets), g in zip(gate_hyperplanes(net, x), net.gates(x)):
        s = x @ normals.T + offsets if normals.dim() == 2 else torch.einsum("nud,nd->nu", normals, x) + offsets
        assert torch.equal((s > 0).to(F64), g)
    if gating == "relu":
        with pytest.raises(ValueError, match="pass x"):
            gate_hyperplanes(net)


def test_conv_dlgn_hyperplanes():
    net = npx.ConvDGN("vconv", in_channels=2, channels=(2, 3), hidden=(4,), image_size=4, gating="linear").double()
    x = torch.rand(9, 2, 4, 4, dtype=F64)
    for (n, o), g in zip(gate_hyperplanes(net), net.gates(x)):
        assert torch.equal(((x.reshape(9, -1) @ n.T + o) > 0).to(F64), g.reshape(9, -1))


def test_dlgn_vt_kernel_is_the_product_of_overlaps():
    vt = DLGNVT(5, 3, 4, out_dim=2).double()
    x = torch.randn(7, 5, dtype=F64)
    phi = vt.npf(x)
    assert torch.allclose(phi @ vt.npv(), vt(x).detach(), rtol=1e-12, atol=1e-14)
    gs = vt.gates(x)
    prod = (gs[0] @ gs[0].T) * (gs[1] @ gs[1].T) * (gs[2] @ gs[2].T)
    assert torch.allclose(npx.npk(vt, x), prod.detach(), rtol=1e-12)
    assert torch.allclose(npx.npk(vt, x), phi @ phi.T, rtol=1e-12)


def _leaf_recursive(x, w, node=0):
    if node >= len(w):
        return node
    return _leaf_recursive(x, w, 2 * node + 2 if float(np.dot(w[node], x)) > 0 else 2 * node + 1)


def test_tree_labels_agree_with_an_independent_traversal():
    x, y, w = trees.generate(7, 500, seed=11)
    assert w.shape == (15, 7) and np.allclose(np.linalg.norm(w, axis=1), 1)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    leaves = np.array([_leaf_recursive(xi.astype(np.float64), w) for xi in x])
    assert ((15 <= leaves) & (leaves <= 30)).all() and np.array_equal(y, leaves % 2)
    xm, ym, wm = trees.generate(7, 300, seed=11, margin=0.05)
    assert len(xm) == 300 and (np.abs(xm @ wm.T) >= 0.05).all()
    tr, te = trees.split(y)
    assert len(te) == pytest.approx(100, abs=1) and not set(tr) & set(te)


def test_tree_sets_load_by_name():
    x, y = npx.datasets.load("sd-i", "test")
    assert x.shape == (8000, 20) and set(y.tolist()) == {0, 1}
    assert npx.datasets.split_size("sd-i", "train") == 32000


def test_reproduce_dlgn_quick(tmp_path, cli):
    r = cli("reproduce", "dlgn", "--budget", "quick", "--sets", "sd-i", "--epochs", "2", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert "| DLGN | " in r.stdout and "96.05" in r.stdout
    assert (tmp_path / "hyperplanes.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "dlgn.png").read_bytes()[:4] == b"\x89PNG"


def test_flnpf_freezes_a_trained_dlgns_gating_network(tmp_path):
    """FLNPF with linear gates: the gating network of a trained DLGN (a dlnpf run with gating='linear') is copied and
    frozen, the value network is fresh; the source must be such a run, not a ReLU one."""
    from neuralpath.errors import NeuralpathError
    from neuralpath.loading import load_net
    from neuralpath.train import TrainConfig, train

    common = dict(arch="fc", dataset="sd-i", width=8, depth=3, epochs=2, lr=1e-2, optimizer="adam", device="cpu")
    src = tmp_path / "dlgn"
    train(TrainConfig(regime="dlnpf", gating="linear", **common), src, progress=False, log=lambda m: None)
    out = tmp_path / "flnpf"
    cfg = TrainConfig(regime="flnpf", gating="linear", relu_checkpoint=str(src / "best.pt"), seed=1, **common)
    train(cfg, out, progress=False, log=lambda m: None)
    a, b = load_net(src / "best.pt"), load_net(out / "best.pt")
    for (ka, va), (kb, vb) in zip(a.feature_layers.state_dict().items(), b.feature_layers.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # the DLGN's gating network, unchanged by FLNPF's training
    assert not torch.equal(a.value_layers[0].weight, b.value_layers[0].weight)
    x = torch.randn(64, 20)
    ga, gb = a.gates(x), b.gates(x)
    for u, v in zip(ga, gb):
        # hard gates of the same half-spaces: the source's soft gate (1 + eps) sigmoid(beta q) is above half its range
        assert torch.equal((u > (1 + a.eps) / 2).float(), v)
    relu = tmp_path / "relu"
    train(TrainConfig(regime="relu", **common), relu, progress=False, log=lambda m: None)
    bad = TrainConfig(regime="flnpf", gating="linear", relu_checkpoint=str(relu / "best.pt"), **common)
    with pytest.raises(NeuralpathError, match="not a 'dlnpf' run"):
        train(bad, tmp_path / "bad", progress=False, log=lambda m: None)


class TestDLGNVTKernelBattery(KernelTestBase):
    """The DLGN-VT kernel through the shared battery: closed form (through the Gram engine) against its explicit
    path features, the diagonal, blocking, symmetry and positive semi-definiteness."""

    methods = ("closed_form", "paths")

    def kernel(self, net, x1, x2=None, **kw):
        return npx.npk(net, x1, x2, **kw)

    def cases(self):
        torch.manual_seed(3)
        vt = DLGNVT(5, 3, 4, out_dim=2).double()
        g = torch.Generator().manual_seed(4)
        return [(vt, torch.randn(8, 5, generator=g, dtype=F64), torch.randn(5, 5, generator=g, dtype=F64))]


def test_dlgn_vt_kernel_refusals():
    vt = DLGNVT(5, 3, 3).double()
    x = torch.randn(4, 5, dtype=F64)
    with pytest.raises(NeuralpathError, match="unnormalised"):
        npx.npk(vt, x, normalize="cosine")
    with pytest.raises(NeuralpathError, match="diag=True takes x1 only"):
        npx.npk(vt, x, x, diag=True)
