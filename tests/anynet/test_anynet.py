"""Any ReLU network: the path algebra of from_module checked against explicit path enumeration (float64), the DGN of
a model, its regimes through the training engine, the CLI with --module, and clear refusals."""

import json
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import neuralpath as npx
from neuralpath.anynet import from_module, module_regime
from neuralpath.errors import NeuralpathError

F64 = torch.float64


@pytest.fixture(autouse=True)
def _every_pair_tensor_from_the_pool(monkeypatch):
    """The kernels of this module take every pair tensor from the buffer pool (whose size floor otherwise keeps
    small test models off it), so the exactness battery covers the pool's reuse across tiles and ops."""
    from neuralpath.anynet import npk as anpk

    monkeypatch.setattr(anpk.Pool, "MIN_NUMEL", 0)


def _randomize_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for b in m.modules():
        if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d)):
            b.running_mean.copy_(torch.randn(b.running_mean.shape, generator=g))
            b.running_var.copy_(torch.rand(b.running_var.shape, generator=g) + 0.5)
            b.weight.data.copy_(torch.randn(b.weight.shape, generator=g))
            b.bias.data.copy_(torch.randn(b.bias.shape, generator=g))
    return m


class UserBlock(nn.Module):  # written the way torchvision's BasicBlock is
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class UserResNet(nn.Module):
    def __init__(self, c=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(UserBlock(c, c))
        self.layer2 = nn.Sequential(UserBlock(c, 2 * c, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def user_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.head = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        z = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(torch.nn.functional.avg_pool2d(z, 2).flatten(1))


class MeanPool(nn.Module):  # global average pooling written as a mean, flattened through x.shape[0]
    def __init__(self, keepdim):
        super().__init__()
        self.keepdim = keepdim
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        z = torch.relu(self.b(torch.relu(self.a(x))))
        z = z.mean(dim=(-2, -1), keepdim=True) if self.keepdim else torch.mean(z, (2, 3))
        return self.head(z.reshape(x.shape[0], -1))


def _models():
    return {
        "mean-pool": lambda: MeanPool(keepdim=False),
        "mean-pool-keepdim": lambda: MeanPool(keepdim=True),
        "resnet": lambda: _randomize_bn(UserResNet(c=1)),
        "cnn-maxpool": user_cnn,
        "concat": Concat,
        # a Linear on an (n, C, H, W) map acts on the last axis at every (C, H) position; its bias is per output
        # feature (the path enumeration once broadcast it as a per-channel bias and crashed)
        "linear-per-position": lambda: nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1),
            nn.ReLU(),
            nn.Linear(4, 5),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 5, 2),
        ),
        "mlp": lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(48, 6),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(6, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(),
            nn.Linear(5, 2),
        ),
    }


def _check_exact(model, x, dgn=None):
    model = model.double().eval()
    d = dgn or from_module(model, x[:2])
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(d(x), ref)  # the tied DGN is the model
    phi, v = npx.npf(d, x), npx.npv(d)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()  # noqa: E731
    assert rel(phi @ v, d(x).detach()) <= 1e-10
    H = npx.npk(d, x)
    assert rel(H, phi @ phi.T) <= 1e-10
    Hx = npx.npk(d, x[:3], x[3:])
    assert rel(Hx, phi[:3] @ phi[3:].T) <= 1e-10
    assert rel(npx.npk(d, x, diag=True), (phi * phi).sum(1)) <= 1e-10  # the paired (diagonal) propagation
    return d


@pytest.mark.parametrize("name", list(_models()))
def test_npk_equals_enumerated_paths(name):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=F64) if name != "resnet" else torch.randn(6, 3, 3, 3, dtype=F64)
    _check_exact(_models()[name](), x)


@pytest.mark.parametrize("name", ["cnn-maxpool", "resnet"])
@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_untied_dgn_of_a_model_is_exact(name, gate):
    """Value network gated by the model's gates (hard or soft): npf @ npv is the DGN's output, npk = npf npf^T."""
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, 4, dtype=F64) if name != "resnet" else torch.randn(5, 3, 3, 3, dtype=F64)
    model = _models()[name]().double().eval()
    d = from_module(model, x[:2], tied=False, gate=gate).reset_value(7)
    _randomize_bn(d.value, seed=3)
    phi, v = npx.npf(d, x), npx.npv(d)
    out = d(x).detach()
    assert ((phi @ v - out).abs().max() / out.abs().max()).item() <= 1e-10
    H = npx.npk(d, x)
    assert ((H - phi @ phi.T).abs().max() / (phi @ phi.T).abs().max()).item() <= 1e-10


def _random_module(draw):
    """A small random composition of the supported layers, with a residual block and pooling choices."""
    c = draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 2, 3]))
    stride, dil = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    pad = draw(st.integers(0, (k - 1) * dil))
    layers = [nn.Conv2d(2, c, k, stride=stride, padding=pad, dilation=dil, bias=draw(st.booleans()))]
    act = draw(st.sampled_from(["relu", "leaky"]))
    layers.append(nn.ReLU() if act == "relu" else nn.LeakyReLU(0.3))
    pool = draw(st.sampled_from(["max", "avg", "avg-nopad", "avg-ceil", "none"]))
    if pool == "max":
        layers.append(nn.MaxPool2d(2, stride=draw(st.sampled_from([1, 2]))))
    elif pool == "avg-ceil":
        layers.append(nn.AvgPool2d(2, stride=2, ceil_mode=True))
    elif pool == "avg":
        layers.append(nn.AvgPool2d(3, stride=2, padding=1))
    elif pool == "avg-nopad":
        layers.append(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False))
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(c))
    groups = c if draw(st.booleans()) else 1
    layers += [
        nn.Conv2d(c, c, 3, padding=1, groups=groups, dilation=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(draw(st.sampled_from([1, 2]))),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers), c


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_modules_are_exact(data):
    seq, c = _random_module(data.draw)
    probe = seq.double().eval()(torch.zeros(1, 2, 7, 7, dtype=F64))
    model = nn.Sequential(*seq, nn.Linear(probe.shape[1], 2)).double().eval()
    _randomize_bn(model, seed=data.draw(st.integers(0, 100)))
    x = torch.randn(4, 2, 7, 7, dtype=F64, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 100))))
    _check_exact(model, x)


def test_ntk_of_the_value_network_with_frozen_gates_equals_autograd():
    torch.manual_seed(2)
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    model = _randomize_bn(UserResNet()).double().eval()
    d, params = module_regime(model, x[:2], "flnpf", seed=5)
    d = d.double()
    K = npx.ntk(d, x, params="value", trace=False)
    G = []
    for i in range(3):
        rows = []
        for k in range(3):
            g = torch.autograd.grad(d(x[i : i + 1])[0, k], d.value_parameters(), allow_unused=True)
            rows.append(torch.cat([t.flatten() for t in g if t is not None]))
        G.append(torch.stack(rows))
    G = torch.stack(G)
    assert torch.allclose(K, torch.einsum("akp,bjp->abkj", G, G), rtol=1e-10, atol=1e-12)
    assert torch.allclose(npx.ntk(d, x, params="value", method="vp", trace=False), K, rtol=1e-10, atol=1e-12)


def test_regimes_of_a_model_and_training_through_the_engine():
    from neuralpath.train import FitOptions, RunData, RunSpec, fit

    torch.manual_seed(3)
    x = torch.rand(64, 3, 4, 4)
    y = (x.mean((1, 2, 3)) > 0.5).long() + (x[:, 0].mean((1, 2)) > 0.5).long()
    data = RunData(x, y, x[:32], y[:32], "toy")
    model = user_cnn().eval()
    specs = []
    for i, regime in enumerate(("relu", "flnpf", "frnpf-ii", "frnpf-di", "dlnpf")):
        d, _ = module_regime(model if regime == "flnpf" else user_cnn().eval(), x[:2], regime, seed=i)
        specs.append(RunSpec(net=d, seed=i, train_idx=torch.arange(64), label=regime))
    flnpf = specs[1].net
    assert flnpf.features_frozen and not torch.equal(flnpf.value[0].weight, model[0].weight)
    before = {k: v.clone() for k, v in flnpf.feature.state_dict().items()}
    res = fit(specs, data, FitOptions(lr=1e-2, epochs=3, device="cpu"), progress=False)
    assert all(0 <= r["best_test_acc"] <= 1 for r in res)
    assert all(torch.equal(before[k], v) for k, v in flnpf.feature.state_dict().items())  # frozen gates stay
    one = module_regime(user_cnn().eval(), x[:2], "relu", seed=0)[0]
    one.load_state_dict(specs[0].net.state_dict())
    assert torch.equal(one(x), specs[0].net(x))


class MeanOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)).mean(1).flatten(1))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.GELU(), nn.Linear(4, 2)), "GELU"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.Tanh(), nn.Linear(4, 2)), "Tanh"),
        (lambda: MeanOverChannels(), "only the spatial mean"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)).train(),
            "training mode",
        ),
    ],
)
def test_unsupported_models_are_refused_naming_the_node(bad, match):
    with pytest.raises(NeuralpathError, match=match):
        from_module(bad(), torch.randn(2, 3, 4, 4))


def test_data_dependent_control_flow_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 2)

        def forward(self, x):
            return self.l(x) if x.sum() > 0 else -self.l(x)

    with pytest.raises(NeuralpathError, match="branch on the data"):
        from_module(Branchy(), torch.randn(2, 4))

    class Tanh(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    with pytest.raises(NeuralpathError, match="tanh"):
        from_module(Tanh(), torch.randn(2, 4))


def test_cli_kernel_fit_and_npk_with_a_user_module(tmp_path, cli, mnist_root):
    (tmp_path / "usernet.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def make():
            return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))
    """)
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import usernet

        torch.manual_seed(0)
        torch.save(usernet.make().state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
    env = {"PYTHONPATH": str(tmp_path)}
    r = cli(
        "kernel",
        "npk",
        "--module",
        "usernet:make",
        "--weights",
        tmp_path / "w.pt",
        "--num-inputs",
        "40",
        "--data-root",
        mnist_root,
        "--dtype",
        "float64",
        "--out",
        tmp_path / "K.npy",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    import numpy as np

    K = np.load(tmp_path / "K.npy")
    assert K.shape == (40, 40) and np.allclose(K, K.T) and (np.linalg.eigvalsh(K) > -1e-8 * K.max()).all()
    r = cli(
        "kernel",
        "fit",
        "--module",
        "usernet:make",
        "--weights",
        tmp_path / "w.pt",
        "--n-train",
        "300",
        "--n-test",
        "100",
        "--data-root",
        mnist_root,
        env=env,
    )
    assert r.returncode == 0 and "NPK + KRR: test accuracy" in r.stdout, r.stderr
    r = cli(
        "kernel",
        "ntk",
        "--module",
        "usernet:make",
        "--weights",
        tmp_path / "w.pt",
        "--num-inputs",
        "12",
        "--data-root",
        mnist_root,
        "--dtype",
        "float64",
        "--out",
        tmp_path / "N.npy",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    N = np.load(tmp_path / "N.npy")
    assert N.shape == (12, 12) and np.array_equal(N, N.T) and (np.linalg.eigvalsh(N) > -1e-8 * N.max()).all()
    assert json.loads((tmp_path / "N.json").read_text())["method"] == "jacobian"
    r = cli("kernel", "npk", "--module", "usernet:nope", "--out", tmp_path / "K2.npy", env=env)
    assert r.returncode == 1 and "cannot import" in r.stderr and "Traceback" not in r.stderr


def test_resnet_arch_trains_and_loads(tmp_path):
    from neuralpath.train import TrainConfig, train

    kw = dict(arch="resnet", dataset="synthetic", width=4, blocks=[1, 1], epochs=1, lr=3e-3, extra={"shape": [3, 8, 8]})
    train(TrainConfig(regime="relu", **kw), tmp_path / "r", progress=False)
    res = train(TrainConfig(regime="flnpf", relu_checkpoint=str(tmp_path / "r"), **kw), tmp_path / "f", progress=False)
    run = npx.load_run(tmp_path / "f")
    x, y = npx.datasets.synthetic("test", shape=(3, 8, 8))
    with torch.no_grad():
        assert (run.net(x).argmax(1) == y).double().mean().item() == pytest.approx(res["best_test_acc"], abs=1e-12)
    assert run.net.features_frozen and run.net.config()["arch"] == "resnet"


def test_npk_of_no_inputs_is_empty():
    """Zero inputs give a (0, 0) kernel, as for the FC and conv DGNs (the module path sizes its feature cache from
    the traced shapes, not from a first input)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    d = from_module(m, torch.zeros(1, 3, 8, 8))
    for normalize in (None, "cosine"):
        assert npx.npk(d, torch.zeros(0, 3, 8, 8), normalize=normalize).shape == (0, 0)


def test_buffer_pool_reuses_only_free_buffers_and_changes_no_value(monkeypatch):
    """Pool: a buffer comes back only once no tensor shares its memory; with every pair tensor taken from the pool
    (its size floor at 0) the kernel is bit-identical to fresh tensors throughout."""
    from neuralpath.anynet import npk as anpk

    pool = anpk.Pool()
    assert pool.users is not None  # this PyTorch has the storage counter the pool relies on
    like = torch.zeros((), dtype=F64)
    pool.MIN_NUMEL = 0
    pool.start(2, 2)
    a = pool.take((3, 4), like)
    b = pool.take((3, 4), like)
    assert a.data_ptr() != b.data_ptr()  # a is still held
    view = a[1:]
    del a
    c = pool.take((3, 4), like)
    assert c.data_ptr() not in (view.data_ptr() - 4 * 8, b.data_ptr())  # a view keeps a's memory taken
    del view, c
    assert pool.take((3, 4), like) is not None and len(pool.bufs[((3, 4), F64, like.device)]) == 3
    torch.manual_seed(0)
    m = _randomize_bn(UserResNet(c=3), 2).double().eval()
    x = torch.randn(21, 3, 6, 6, dtype=F64)
    d = from_module(m, x[:2])
    monkeypatch.setattr(anpk.Pool, "MIN_NUMEL", 0)
    pooled = npx.npk(d, x, block=8), npx.npk(d, x[:5], x[5:], block=8)
    monkeypatch.setattr(anpk, "_storage_users", lambda: None)  # every tensor fresh
    fresh = npx.npk(d, x, block=8), npx.npk(d, x[:5], x[5:], block=8)
    assert all(torch.equal(p, f) for p, f in zip(pooled, fresh))
