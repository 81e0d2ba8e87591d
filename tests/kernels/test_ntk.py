import pytest
import torch
from conftest import randomize_biases

import neuralpath as npx
from neuralpath.errors import NeuralpathError
from neuralpath.testing import KernelTestBase

F64 = torch.float64


def nets():
    torch.manual_seed(0)
    return [
        randomize_biases(npx.FCDGN(in_dim=6, width=5, depth=4, out_dim=3, tied=True).double()),
        randomize_biases(npx.FCDGN(in_dim=6, width=5, depth=4, out_dim=3, gate="soft").double()),
        npx.FCDGN(in_dim=6, width=5, depth=3, out_dim=2, gate="soft", bias=False).double(),
        randomize_biases(npx.FCDGN(in_dim=6, width=5, depth=4, out_dim=3, gate="hard").double()),
        randomize_biases(
            npx.ConvDGN(
                "vconv", in_channels=2, out_dim=3, channels=(2, 3), hidden=(4,), image_size=5, gate="soft"
            ).double()
        ),
        randomize_biases(
            npx.ConvDGN(
                "gconv", in_channels=2, out_dim=3, channels=(2, 3), hidden=(4,), image_size=5, gate="soft"
            ).double()
        ),
        randomize_biases(
            npx.ConvDGN("gconv", in_channels=1, out_dim=2, channels=(3,), hidden=(), image_size=4, tied=True).double()
        ),
    ]


def xs(net, n, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (net.in_dim,) if isinstance(net, npx.FCDGN) else (net.in_channels, net.image_size, net.image_size)
    return torch.rand((n, *shape), generator=g, dtype=F64)


@pytest.mark.parametrize("net", nets(), ids=lambda n: f"{type(n).__name__}-{n.gate_kind}-tied{n.tied}")
@pytest.mark.parametrize("params", ["value", "feature", "all"])
def test_every_method_agrees_with_every_other(net, params):
    x1, x2 = xs(net, 4, 0), xs(net, 3, 1)
    ref = npx.ntk(net, x1, x2, params=params, method="jacobian", trace=False)
    scale = max(ref.abs().max().item(), 1.0)
    for method in ("structured", "vp"):
        K = npx.ntk(net, x1, x2, params=params, method=method, trace=False)
        assert (K - ref).abs().max().item() <= 1e-10 * scale
        Kt = npx.ntk(net, x1, x2, params=params, method=method)
        assert (Kt - ref.diagonal(dim1=2, dim2=3).sum(-1)).abs().max().item() <= 1e-10 * scale
    if params == "feature" and (net.gate_kind == "hard" or net.tied):
        assert ref.abs().max().item() == 0.0
    if params == "all":
        parts = npx.ntk(net, x1, x2, params="value") + npx.ntk(net, x1, x2, params="feature")
        assert torch.allclose(npx.ntk(net, x1, x2, params="all"), parts, rtol=1e-10)


@pytest.mark.parametrize("net", nets()[:2] + nets()[4:6], ids=["fc-tied", "fc-soft", "vconv-soft", "gconv-soft"])
def test_weights_only_kernel_agrees_across_methods(net):
    """biases=False: derivatives w.r.t. the weights only; every method agrees, and the bias part is what differs."""
    x1, x2 = xs(net, 4, 0), xs(net, 3, 1)
    ref = npx.ntk(net, x1, x2, params="all", method="jacobian", biases=False)
    for method in ("structured", "vp"):
        K = npx.ntk(net, x1, x2, params="all", method=method, biases=False)
        assert (K - ref).abs().max().item() <= 1e-10 * max(ref.abs().max().item(), 1.0)
    full = npx.ntk(net, x1, x2, params="all")
    assert (full - ref).abs().max().item() > 1e-6  # the biases contribute


def test_structured_matches_autograd_gradient_inner_products():
    """Independent check: explicit per-example gradients with loss.backward()."""
    net = randomize_biases(npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2, gate="soft").double())
    x = xs(net, 3, 5)
    grads = []
    for i in range(3):
        row = []
        for k in range(2):
            net.zero_grad()
            net(x[i : i + 1])[0, k].backward()
            row.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        grads.append(torch.stack(row))
    G = torch.stack(grads)  # (n, k, P)
    K = torch.einsum("akp,bkp->ab", G, G)
    assert torch.allclose(npx.ntk(net, x, params="all"), K, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    net = npx.FCDGN(in_dim=4, width=3, depth=3, out_dim=2)
    x = torch.rand(2, 4)
    with pytest.raises(ValueError, match="params='weights'"):
        npx.ntk(net, x, params="weights")
    with pytest.raises(ValueError, match="method='fast'"):
        npx.ntk(net, x, method="fast")
    with pytest.raises(NeuralpathError, match="out="):
        npx.ntk(net, x, method="vp", out="k.npy")
    with pytest.raises(NeuralpathError, match="out="):
        npx.ntk(net, x, method="jacobian", trace=False, out="k.npy")


class TestNTKBattery(KernelTestBase):  # tolerances from neuralpath.testing.TOL (float64: 1e-10)
    methods = ("structured", "jacobian", "vp")

    def kernel(self, net, x1, x2=None, **kw):
        return npx.ntk(net, x1, x2, params="all", **kw)

    def cases(self):
        return [(n, xs(n, 6, 0), xs(n, 4, 1)) for n in nets()[1:2] + nets()[5:6]]


@pytest.mark.parametrize("net", nets()[1:2] + nets()[4:6], ids=["fc-soft", "vconv-soft", "gconv-soft"])
def test_featurising_in_chunks_changes_nothing(net, monkeypatch):
    """Large blocks are featurised in memory-bounded chunks (at least 8 inputs each); the kernel must not depend on
    the chunking, in any of its forms (traced, per output, diagonal)."""
    from neuralpath.kernels import ntk as ntk_module

    x1, x2 = xs(net, 19, 2), xs(net, 11, 3)
    whole = npx.ntk(net, x1, x2, params="all", trace=False), npx.ntk(net, x1, diag=True, params="all", block=64)
    monkeypatch.setattr(ntk_module, "_CHUNK_BYTES", 1)
    chunked = npx.ntk(net, x1, x2, params="all", trace=False), npx.ntk(net, x1, diag=True, params="all", block=64)
    for a, b in zip(whole, chunked):
        assert (a - b).abs().max().item() <= 1e-12 * a.abs().max().item()


def test_blocked_jacobian_tiles_and_stream_equal_the_whole_jacobian(tmp_path, monkeypatch):
    """The traced jacobian method runs tile by tile through the Gram engine (memory per tile): with tiles of one or
    two inputs (forced by the per-tile budget), symmetric and cross, in memory and streamed to a file, it equals
    the per-output kernel's trace (all Jacobians at once) and the structured kernel (float64)."""
    import numpy as np

    import neuralpath.kernels.ntk as ntk_mod

    net = nets()[5]
    x1, x2 = xs(net, 5, 0), xs(net, 3, 1)
    whole = npx.ntk(net, x1, params="all", method="jacobian", trace=False).diagonal(dim1=2, dim2=3).sum(-1)
    whole12 = npx.ntk(net, x1, x2, params="all", method="jacobian", trace=False).diagonal(dim1=2, dim2=3).sum(-1)
    per_input = net.out_dim * sum(p.numel() for p in net.parameters()) * 8
    monkeypatch.setattr(ntk_mod, "_JAC_TILE_BYTES", 2 * 2 * per_input)  # tiles of 2 inputs
    assert ntk_mod._jacobian_block(net, ntk_mod._param_dict(net, "all"), 256) == (2, per_input)
    K = npx.ntk(net, x1, params="all", method="jacobian")
    assert torch.allclose(K, whole, rtol=1e-12, atol=1e-14) and torch.equal(K, K.T)
    assert torch.allclose(npx.ntk(net, x1, x2, params="all", method="jacobian"), whole12, rtol=1e-12, atol=1e-14)
    assert torch.allclose(npx.ntk(net, x1, params="all"), K, rtol=1e-10, atol=1e-12)
    path = npx.ntk(net, x1, params="all", method="jacobian", out=tmp_path / "k.npy")
    assert np.array_equal(np.load(path), K.numpy())
    monkeypatch.setattr(ntk_mod, "_JAC_TILE_BYTES", 1)  # below one input: tiles of one
    assert torch.allclose(npx.ntk(net, x1, params="all", method="jacobian", block=64), whole, rtol=1e-12, atol=1e-14)


def test_jacobian_paths_refuse_what_does_not_fit_before_any_work(monkeypatch):
    """A model whose Jacobians cannot fit is refused in one line naming the size, instead of being killed by the
    kernel's out-of-memory handler part way (the any-network NTK of a large model used to try)."""
    import neuralpath.kernels.gram as gram_mod

    net = nets()[5]
    x = xs(net, 4, 0)
    per_input = net.out_dim * sum(p.numel() for p in net.parameters()) * 8
    monkeypatch.setattr(gram_mod, "_avail_memory", lambda: 5 * per_input)
    with pytest.raises(NeuralpathError, match=r"GiB per input .* more than the .* GiB available"):
        npx.ntk(net, x, params="all", method="jacobian")
    monkeypatch.setattr(gram_mod, "_avail_memory", lambda: 10 * per_input)
    assert npx.ntk(net, x, params="all", method="jacobian").shape == (4, 4)  # tiles of one input fit
    with pytest.raises(NeuralpathError, match="per-output NTK of 4 inputs holds their Jacobians at once"):
        npx.ntk(net, x, params="all", method="jacobian", trace=False)
    with pytest.raises(NeuralpathError, match="NTK-vector products of 4 inputs"):
        npx.ntk(net, x, params="all", method="vp")


def test_any_network_ntk_is_blocked_and_streams(tmp_path, monkeypatch):
    """An any-network DGN's NTK (the jacobian method) in tiles equals the whole Jacobians' contraction; a stream
    resumes under its identity."""
    import numpy as np

    import neuralpath.kernels.ntk as ntk_mod

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 2)
    ).double()
    x = torch.rand(5, 2, 4, 4, dtype=F64)
    d = npx.from_module(model, x[:2])
    whole = npx.ntk(d, x, method="jacobian", trace=False).diagonal(dim1=2, dim2=3).sum(-1)
    monkeypatch.setattr(ntk_mod, "_JAC_TILE_BYTES", 4 * 2 * sum(p.numel() for p in model.parameters()) * 8)
    K = npx.ntk(d, x)  # the structured default falls back to the jacobian method for any-network DGNs
    assert torch.allclose(K, whole, rtol=1e-12, atol=1e-14)
    assert np.array_equal(np.load(npx.ntk(d, x, out=tmp_path / "k.npy")), K.numpy())
