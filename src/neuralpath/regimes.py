"""The five training regimes of the paper (arXiv 2006.10529; docs/THEORY.md §3): who is initialised how, what is
copied, frozen and trained.

| regime   | gates | feature network                                   | trained           |
|----------|-------|---------------------------------------------------|-------------------|
| relu     | hard  | tied to the value network (one set of weights)    | all               |
| dlnpf    | soft  | independent initialisation                        | both, one loss    |
| flnpf    | hard  | copy of a trained ReLU net's hidden layers, frozen | value, fresh init |
| frnpf-di | hard  | copy of the value network's initial weights, frozen| value             |
| frnpf-ii | hard  | independent random initialisation, frozen         | value             |
(The authors' sgd-mnist notebook swaps the II/DI labels in its code; these are the definitions of the text.)
"""

from __future__ import annotations

import math

import torch

from .errors import NeuralpathError, check_choice
from .nets import FCDGN, ConvDGN

REGIMES = ("relu", "dlnpf", "flnpf", "frnpf-ii", "frnpf-di")
ARCHS = ("fc", "vconv", "gconv", "resnet")


def make_resnet(
    seed: int, in_shape=(3, 32, 32), out_dim: int = 10, width: int = 16, blocks=(1, 1, 1), bn: bool = False
):
    """A CIFAR ResNet (neuralpath.nets.resnet) with PyTorch's default initialisation drawn under ``seed``."""
    from .nets.resnet import CifarResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return CifarResNet(blocks=tuple(blocks), width=width, in_channels=in_shape[0], out_dim=out_dim, bn=bn)


def _resnet_regime(
    regime, seed, relu_state, in_shape=(3, 32, 32), out_dim=10, width=16, blocks=(1, 1, 1), bn=False, **_
):
    from .anynet import from_module, module_regime

    example = torch.zeros((1, *in_shape))
    model = make_resnet(seed, in_shape, out_dim, width, blocks, bn)
    if regime == "relu":
        d = from_module(model, example, tied=True)
        return d, list(d.parameters())
    init = None
    if regime == "flnpf":
        if relu_state is None:
            raise NeuralpathError("regime 'flnpf' needs a trained ReLU network: pass --relu-checkpoint RUN_DIR_OR_FILE")
        src = {k.removeprefix("feature."): v for k, v in relu_state.items() if k.startswith("feature.")}
        try:
            model.load_state_dict(src)
        except RuntimeError as e:
            raise NeuralpathError(
                f"the ReLU checkpoint does not fit this ResNet ({str(e).splitlines()[0][:120]})"
            ) from None
    elif regime in ("frnpf-ii", "dlnpf"):
        init = make_resnet(seed + 1_000_003, in_shape, out_dim, width, blocks, bn)  # independent of the value init
    return module_regime(model, example, regime, seed=seed, init_model=init)


def make_net(
    arch: str,
    *,
    in_shape=(1, 28, 28),
    out_dim: int = 10,
    width: int = 128,
    depth: int = 6,
    gate: str = "hard",
    tied: bool = False,
    bias: bool = True,
    channels=None,
    hidden=None,
    generator=None,
    init: str = "glorot",
    **kw,
):
    """A DGN of the named architecture for images of shape ``in_shape``."""
    check_choice("arch", arch, ARCHS)
    if arch == "resnet":
        raise NeuralpathError("make_net builds FC and conv DGNs; build ResNets with build_regime(..., 'resnet', ...)")
    if arch != "fc" and len(in_shape) != 3:
        raise NeuralpathError(
            f"arch {arch!r} needs images (channels, height, width); this data has inputs of shape {tuple(in_shape)}: "
            "use arch 'fc'"
        )
    if arch == "fc":
        return FCDGN(
            in_dim=int(math.prod(in_shape)),
            width=width,
            depth=depth,
            out_dim=out_dim,
            gate=gate,
            tied=tied,
            bias=bias,
            generator=generator,
            init=init,
            **kw,
        )
    c, h, w = in_shape
    if h != w:
        raise NeuralpathError(f"conv architectures need square images, got {h}x{w}")
    extra = {}
    if channels is not None:
        extra["channels"] = tuple(channels)
    if hidden is not None:
        extra["hidden"] = tuple(hidden)
    return ConvDGN(
        arch=arch,
        in_channels=c,
        out_dim=out_dim,
        gate=gate,
        tied=tied,
        bias=bias,
        image_size=h,
        generator=generator,
        init=init,
        **extra,
        **kw,
    )


def _same_shape(a, b) -> bool:
    sa = {k: v.shape for k, v in a.items()}
    sb = {k: v.shape for k, v in b.items()}
    return sa == sb


def build_regime(regime: str, arch: str, seed: int = 0, relu_state: dict | None = None, **net_kw):
    """Build the network of one regime and return (net, trainable parameters).

    ``relu_state`` (FLNPF only) is the state_dict of a trained tied ReLU network of the same shape; its hidden
    layers' weights and biases become the frozen feature network.
    """
    check_choice("regime", regime, REGIMES)
    if arch == "resnet":
        return _resnet_regime(regime, seed, relu_state, **net_kw)
    g = torch.Generator().manual_seed(int(seed))
    if regime == "relu":
        net = make_net(arch, gate="hard", tied=True, generator=g, **net_kw)
        return net, list(net.parameters())
    if regime == "dlnpf":
        net = make_net(arch, gate="soft", tied=False, generator=g, **net_kw)
        return net, list(net.parameters())
    net = make_net(arch, gate="hard", tied=False, generator=g, **net_kw)  # value and feature: independent draws
    if regime == "frnpf-di":
        for f, v in zip(net.feature_layers, net.value_layers):
            f.load_state_dict(v.state_dict())
    elif regime == "flnpf":
        if relu_state is None:
            raise NeuralpathError("regime 'flnpf' needs a trained ReLU network: pass --relu-checkpoint RUN_DIR_OR_FILE")
        if any(k.startswith("feature_layers.") for k in relu_state):  # an untied source (a trained DLGN): its gates
            pre = "feature_layers."
            src = {k.removeprefix(pre): v for k, v in relu_state.items() if k.startswith(pre)}
        else:  # a tied ReLU net: its hidden layers are the gates
            hidden = {
                k.removeprefix("value_layers."): v for k, v in relu_state.items() if k.startswith("value_layers.")
            }
            n_hidden = len(net.feature_layers)
            src = {k: v for k, v in hidden.items() if int(k.split(".")[0]) < n_hidden}
        dst = net.feature_layers.state_dict()
        if not _same_shape(src, dst):
            raise NeuralpathError(
                "the ReLU checkpoint's hidden layers do not match this architecture "
                f"(checkpoint {sorted((k, tuple(v.shape)) for k, v in src.items())[:3]}..., "
                f"expected {sorted((k, tuple(v.shape)) for k, v in dst.items())[:3]}...)"
            )
        net.feature_layers.load_state_dict(src)
    net.freeze_features(True)
    return net, net.value_parameters()
