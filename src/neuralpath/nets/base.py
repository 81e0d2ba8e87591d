"""The deep gated network (DGN) shared by the fully connected and convolutional models (docs/THEORY.md §3).

A DGN of depth d has a feature network (d-1 hidden layers, a ReLU network whose pre-activations q^f give
the gates) and a value network (d layers, the last one the linear output head):

    feature:  q^f_l = Theta^f_l(T_l(z^f_{l-1})),  z^f_l = relu(q^f_l),    G_l = gate(q^f_l)       l = 1..d-1
    value:    z^v_l = G_l * Theta^v_l(T_l(z^v_{l-1}))                                            l = 1..d-1
              yhat  = Theta^v_d(T_d(z^v_{d-1}))

T_l is a fixed linear "transition" before layer l: identity, flatten, or global average pooling.
``tied=True`` makes Theta^f and Theta^v one set of modules with hard gates: the standard ReLU network,
since G * q = 1{q>0} q = relu(q).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..errors import NeuralpathError, check_choice
from ..gates import GATES, gate_fn
from . import rules

INITS = ("glorot", "gaussian", "bernoulli")
GATINGS = ("relu", "linear", "shallow")  # the feature network: a ReLU net (the paper), linear (DLGN), reads x (DLGN-SF)
VALUE_INPUTS = ("x", "ones")  # the value network's input: x, or all ones ("pwc": piecewise constant in x)


def init_layers(layers, init: str = "glorot", c: float = math.sqrt(2.0), generator: torch.Generator | None = None):
    """Initialise Linear/Conv2d layers in place.

    glorot:    uniform(-a, a), a = sqrt(6 / (fan_in + fan_out)), biases zero (Keras' defaults, the authors' runs)
    gaussian:  N(0, sigma^2), sigma = c / sqrt(fan_in), biases zero (the theory's random weights)
    bernoulli: +-sigma with probability 1/2 each, sigma = c / sqrt(fan_in), biases zero (Theorem 5.1)
    """
    check_choice("init", init, INITS)
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            rf = w[0, 0].numel() if w.dim() > 2 else 1
            fan_in, fan_out = w.shape[1] * rf, w.shape[0] * rf
            if init == "glorot":
                a = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-a, a, generator=generator)
            elif init == "gaussian":
                w.normal_(0.0, c / math.sqrt(fan_in), generator=generator)
            else:
                sign = torch.randint(0, 2, w.shape, generator=generator, device=w.device).to(w.dtype) * 2 - 1
                w.copy_(sign * (c / math.sqrt(fan_in)))
            if layer.bias is not None:
                layer.bias.zero_()


def describe_input(x: torch.Tensor) -> str:
    """How a shape error names an input: per example (the kernels probe with one row of a batch, so the batch size
    in the message would be theirs, not the caller's)."""
    if x.dim() < 2:
        return f"input with shape {tuple(x.shape)} (no batch dimension)"
    return f"input with per-example shape {tuple(x.shape[1:])}"


class Layers(nn.ModuleList):
    """A ModuleList of the network's nn.Linear / nn.Conv2d layers (the type tells the checker what it holds)."""

    if TYPE_CHECKING:

        def __iter__(self) -> Iterator[nn.Linear | nn.Conv2d]: ...

        def __getitem__(self, idx: Any) -> Any: ...


class DGN(nn.Module):
    """Base class: subclasses fill ``value_layers``, ``feature_layers`` and ``transitions``."""

    value_layers: Layers
    feature_layers: Layers
    transitions: list  # transitions[l] in {"none", "flatten", "gap"}, applied to the input of layer l (0-based)

    def _setup_gating(
        self, gate: str, beta: float, eps: float, tied: bool, gating: str = "relu", value_input: str = "x"
    ):
        check_choice("gate", gate, GATES)
        check_choice("gating", gating, GATINGS)
        check_choice("value_input", value_input, VALUE_INPUTS)
        if tied and gate != "hard":
            raise NeuralpathError(f"tied=True is the ReLU network and needs gate='hard', got gate={gate!r}")
        if tied and (gating != "relu" or value_input != "x"):
            raise NeuralpathError("tied=True is the ReLU network: it needs gating='relu' and value_input='x'")
        self.gate_kind, self.beta, self.eps, self.tied = gate, float(beta), float(eps), bool(tied)
        self.gating, self.value_input = gating, value_input
        self._gate = gate_fn(gate, beta, eps)

    def value_in(self, z: torch.Tensor) -> torch.Tensor:
        """The value network's input: x itself, or all ones ("pwc": every gate region gets a constant)."""
        return z if self.value_input == "x" else torch.ones_like(z)

    @property
    def depth(self) -> int:
        return len(self.value_layers)

    # -- input handling ---------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch dim: (in_dim,) or (channels, size, size)."""
        attrs = vars(self)  # plain ints set by the subclass constructors
        if "in_dim" in attrs:
            return (int(attrs["in_dim"]),)
        size = int(attrs["image_size"])
        return (int(attrs["in_channels"]), size, size)

    def config(self) -> dict:  # pragma: no cover - overridden
        """The constructor arguments that rebuild this network."""
        raise NotImplementedError

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor):
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}; convert with x.float()")
        p = next(self.parameters())
        if x.dtype != p.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the network has {p.dtype}; use net.to({x.dtype}) or x.to({p.dtype})"
            )
        if x.device != p.device:
            raise TypeError(f"x is on {x.device} but the network is on {p.device}; move one of them")

    def transition(self, l: int, z: torch.Tensor) -> torch.Tensor:
        """T_l applied to z: identity, flatten or global average pooling (nets/rules.py)."""
        return rules.transition(self.transitions[l]).forward(z)

    # -- the two networks -------------------------------------------------------------------------
    def feature_forward(self, x: torch.Tensor):
        """Pre-activations q^f_l and gates G_l of the feature network, l = 1..d-1.

        gating 'relu': q_l = Theta^f_l(relu(q_{l-1})) (the paper); 'linear': q_l = Theta^f_l(q_{l-1}) (DLGN: each
        gate is a half-space test on x); 'shallow': q_l = Theta^f_l(x) (DLGN-SF)."""
        x0 = self._prepare(x)
        z = x0
        qs, gs = [], []
        # a frozen feature network (FLNPF, FRNPF) builds no autograd graph at all
        with torch.no_grad() if getattr(self, "features_frozen", False) else contextlib.nullcontext():
            for l, layer in enumerate(self.feature_layers):
                q = layer(self.transition(l, x0 if self.gating == "shallow" else z))
                qs.append(q)
                gs.append(self._gate(q))
                z = torch.relu(q) if self.gating == "relu" else q
        return qs, gs

    def gates(self, x: torch.Tensor):
        """List of d-1 gate tensors, (n, width) for dense layers and (n, C, H, W) for conv layers."""
        return self.feature_forward(x)[1]

    def value_forward(self, x: torch.Tensor, gates):
        """Output of the value network with the given gates (the gates are not recomputed)."""
        z = self.value_in(self._prepare(x))
        for l, g in enumerate(gates):
            z = g * self.value_layers[l](self.transition(l, z))
        return self.value_layers[-1](self.transition(self.depth - 1, z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tied:  # one pass: G * q = relu(q) with G = 1{q > 0} (and relu's gradient is G: the same network)
            z = self._prepare(x)
            for l, layer in enumerate(self.value_layers[:-1]):
                z = torch.relu(layer(self.transition(l, z)))
            return self.value_layers[-1](self.transition(self.depth - 1, z))
        return self.value_forward(x, self.gates(x))

    def freeze_features(self, frozen: bool = True):
        """Freeze (or unfreeze) the feature network: requires_grad off, and no graph built through it."""
        if self.tied and frozen:
            raise NeuralpathError("a tied (ReLU) network shares its weights: its feature network cannot be frozen")
        for p in self.feature_parameters():
            p.requires_grad_(not frozen)
        self.features_frozen = frozen
        return self

    # -- bookkeeping ------------------------------------------------------------------------------
    def feature_parameters(self):
        return [p for m in self.feature_layers for p in m.parameters()]

    def value_parameters(self):
        return [p for m in self.value_layers for p in m.parameters()]

    def reset_parameters(self, init: str = "glorot", c: float = math.sqrt(2.0), generator=None, which: str = "all"):
        """Re-initialise the value network, the feature network, or both ('value', 'feature', 'all')."""
        check_choice("which", which, ("all", "value", "feature"))
        if which in ("all", "value"):
            init_layers(self.value_layers, init, c, generator)
        if which in ("all", "feature") and not self.tied:
            init_layers(self.feature_layers, init, c, generator)
        return self

    @property
    def has_bias(self) -> bool:
        return self.value_layers[0].bias is not None

    # -- the configuration travels with the weights -----------------------------------------------------------
    def get_extra_state(self):
        """Stored in every state_dict: the network's configuration (gates, beta, shapes), so that weights never
        load silently into a network that would compute something else (e.g. DLNPF's soft gates into hard ones)."""
        return {"config": self.config(), "features_frozen": bool(getattr(self, "features_frozen", False))}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; weights saved before the configuration travelled with them (no ``_extra_state``) load
        without that check."""
        if "_extra_state" not in state_dict:
            state_dict = dict(state_dict, _extra_state=self.get_extra_state())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_extra_state(self, state):
        theirs = dict(state.get("config", {})) if isinstance(state, dict) else {}
        theirs.setdefault("gating", "relu")  # weights saved before the DLGN settings existed
        theirs.setdefault("value_input", "x")
        mine = self.config()
        diff = {
            k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)
        }
        if diff:
            desc = ", ".join(f"{k}={a!r} in the weights vs {b!r} here" for k, (a, b) in diff.items())
            raise NeuralpathError(
                f"these weights belong to another network configuration ({desc}); rebuild the "
                "network with neuralpath.load_net(checkpoint)"
            )
