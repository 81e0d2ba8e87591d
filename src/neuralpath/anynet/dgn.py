"""The deep gated network of any supported ReLU model (docs/THEORY.md §7).

Feature network: the model itself (its pre-activations give the gates; its max pools give the routing). Value
network: a structural copy of the model in which every ReLU/LeakyReLU multiplies by the feature network's gate
instead of applying itself, and every max pool routes by the feature network's arg-max. With both networks sharing
weights and hard gates (``tied=True``) it is the model: ``ModuleDGN(model)(x) == model(x)`` exactly.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NeuralpathError, check_choice
from ..gates import GATES
from .graph import Op, trace


def forward_ops(ops: list[Op], mods: dict, x, gates=None, pools=None, record=None, q_out=None, pool_out=None):
    """Run the op list on x with the parameters of ``mods`` (qualified name -> module).

    gates: None (apply each ReLU/LeakyReLU) or one multiplier per gate op (the DGN's value pass);
    pools: None (max-pool, recording the arg-max) or one index tensor per max-pool op (route by them);
    record: dict filled with every op's output; q_out / pool_out: lists filled with the gate ops' inputs and the
    max pools' indices."""
    vals = []
    gi = pi = 0
    for i, op in enumerate(ops):
        a = [vals[j] for j in op.args]
        k = op.kind
        if k == "input":
            z = x
        elif k in ("linear", "conv"):
            z = mods[op.module](a[0])
        elif k == "bn":
            m = mods[op.module]
            z = F.batch_norm(a[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        elif k == "gate":
            q = a[0]
            if q_out is not None:
                q_out.append(q)
            if gates is None:
                z = F.leaky_relu(q, op.opts["alpha"]) if op.opts["alpha"] else torch.relu(q)
            else:
                z = gates[gi] * q
            gi += 1
        elif k == "maxpool":
            if pools is None:
                z, idx = F.max_pool2d(a[0], return_indices=True, **op.opts)
                if pool_out is not None:
                    pool_out.append(idx)
            else:
                idx = pools[pi]
                z = a[0].flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            pi += 1
        elif k == "avgpool":
            if "adaptive" in op.opts:
                z = F.adaptive_avg_pool2d(a[0], op.opts["adaptive"])
            else:
                z = F.avg_pool2d(a[0], **op.opts)
        elif k == "flatten":
            z = a[0].flatten(1)
        elif k == "identity":
            z = a[0]
        elif k == "add":
            z = a[0] + a[1]
        elif k == "cat":
            z = torch.cat(a, 1)
        else:  # pragma: no cover - trace() admits only the kinds above
            raise NeuralpathError(f"unknown op {k}")
        vals.append(z)
        if record is not None:
            record[i] = z
    return vals[-1]


def run_ops(ops, fmodel, vmodel, x, record=None):
    """The model's own forward through the op list (used to check shapes when tracing)."""
    return forward_ops(ops, dict(vmodel.named_modules()), x, record=record)


class ModuleDGN(nn.Module):
    """The DGN of a traced model; see :func:`from_module`."""

    def __init__(
        self,
        model: nn.Module,
        ops: list[Op],
        gate: str = "hard",
        beta: float = 4.0,
        eps: float = 0.1,
        tied: bool = True,
    ):
        super().__init__()
        check_choice("gate", gate, GATES)
        if tied and gate != "hard":
            raise NeuralpathError(f"tied=True is the model itself and needs gate='hard', got gate={gate!r}")
        self.ops = ops
        self.gate_kind, self.beta, self.eps, self.tied = gate, float(beta), float(eps), bool(tied)
        self.feature = model
        self.value = model if tied else copy.deepcopy(model)
        self.features_frozen = False
        self.gate_ops = [i for i, op in enumerate(ops) if op.kind == "gate"]
        self.pool_ops = [i for i, op in enumerate(ops) if op.kind == "maxpool"]
        # frozen gates can be cached bit-packed only when every gate is 0/1 and no max pool routes
        self.gate_cache_ok = not self.pool_ops and all(ops[i].opts["alpha"] == 0 for i in self.gate_ops)
        self.out_dim = ops[-1].shape[0] if len(ops[-1].shape) == 1 else None
        self.in_shape = ops[0].shape

    # -- the two networks -------------------------------------------------------------------------------------
    def _mods(self, which):
        return dict((self.feature if which == "feature" else self.value).named_modules())

    def feature_state(self, x):
        """(gates, max-pool indices) of the feature network on x: one tensor per ReLU/LeakyReLU and per max pool."""
        qs, pools = [], []
        ctx = torch.no_grad() if (self.features_frozen or self.gate_kind == "hard") else contextlib.nullcontext()
        with ctx:
            forward_ops(self.ops, self._mods("feature"), x, q_out=qs, pool_out=pools)
        gates = []
        for i, q in zip(self.gate_ops, qs):
            alpha = self.ops[i].opts["alpha"]
            if self.gate_kind == "soft":
                g = (1.0 + self.eps) * torch.sigmoid(self.beta * q)
            else:
                g = (q.detach() > 0).to(q.dtype)
                if alpha:
                    g = g + alpha * (1 - g)
            gates.append(g)
        return gates, pools

    def gates(self, x):
        """One gate tensor per ReLU/LeakyReLU of the model, shaped like its input (max-pool routing: feature_state)."""
        return self.feature_state(x)[0]

    def value_forward(self, x, gates, pools=None):
        if pools is None and self.pool_ops:
            pools = self.feature_state(x)[1]
        return forward_ops(self.ops, self._mods("value"), x, gates=gates, pools=pools)

    def forward(self, x):
        if self.tied:  # the model itself
            return forward_ops(self.ops, self._mods("value"), x)
        gates, pools = self.feature_state(x)
        return forward_ops(self.ops, self._mods("value"), x, gates=gates, pools=pools)

    # -- bookkeeping (the interface the regimes and the engine use) ----------------------------------------------
    def feature_parameters(self):
        return list(self.feature.parameters())

    def value_parameters(self):
        return list(self.value.parameters())

    def freeze_features(self, frozen: bool = True):
        if self.tied and frozen:
            raise NeuralpathError("a tied DGN is the model itself: its feature network cannot be frozen")
        for p in self.feature.parameters():
            p.requires_grad_(not frozen)
        self.features_frozen = frozen
        return self

    def reset_value(self, seed: int):
        """Fresh, independent value weights: PyTorch's own initialisation of each layer, under ``seed``."""
        if self.tied:
            raise NeuralpathError("a tied DGN shares its weights with the model; untie it first (tied=False)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for m in self.value.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.reset_parameters()
                elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    m.reset_parameters()  # gamma 1, beta 0, running mean 0, var 1: the value BN is the identity
        return self

    @property
    def has_bias(self) -> bool:
        return any(
            getattr(m, "bias", None) is not None
            for m in self.value.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d))
        )

    def config(self) -> dict:
        own = getattr(self.feature, "config_", None)  # a model of neuralpath's registry (e.g. the CIFAR ResNet)
        base = (
            {"arch": "resnet", **own}
            if (own and type(self.feature).__name__ == "CifarResNet")
            else {"arch": "module", "model": type(self.feature).__name__}
        )
        return {**base, "gate": self.gate_kind, "beta": self.beta, "eps": self.eps, "tied": self.tied}

    def get_extra_state(self):
        return {"config": self.config(), "features_frozen": self.features_frozen}

    def set_extra_state(self, state):
        theirs = state.get("config", {}) if isinstance(state, dict) else {}
        mine = self.config()
        diff = {
            k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)
        }
        if diff:
            desc = ", ".join(f"{k}={a!r} in the weights vs {b!r} here" for k, (a, b) in diff.items())
            raise NeuralpathError(f"these weights belong to another network configuration ({desc})")


def from_module(
    model: nn.Module,
    example: torch.Tensor,
    *,
    gate: str = "hard",
    tied: bool = True,
    beta: float = 4.0,
    eps: float = 0.1,
) -> ModuleDGN:
    """The deep gated network of a user's ReLU model, accepted wherever neuralpath takes a DGN (gates, npk,
    overlaps, npf/npv for tiny models, ntk, the regimes and the training engine).

    ``tied=True`` (default): the model itself (hard gates from its own pre-activations, shared weights).
    ``tied=False``: a value network copied from the model, gated by the model's gates (hard or soft); freeze the
    feature network and re-draw the value weights for FLNPF (:func:`neuralpath.anynet.module_regime`).
    Refuses, naming the node, anything outside the supported layers (see :mod:`neuralpath.anynet.graph`)."""
    ops = trace(model, example)
    return ModuleDGN(model, ops, gate=gate, beta=beta, eps=eps, tied=tied)


def module_regime(model: nn.Module, example, regime: str, seed: int = 0, init_model: nn.Module | None = None):
    """A regime (arXiv 2006.10529; docs/THEORY.md §3) on a model: returns (dgn, trainable parameters).

    relu:      the model itself, trained.
    flnpf:     the model's (trained) gates frozen; value network freshly and independently initialised (seed).
    frnpf-ii:  gates of ``init_model`` (a randomly initialised copy; default: the model re-initialised under
               seed + 1) frozen; value network re-initialised under seed.
    frnpf-di:  gates frozen at the value network's own initial weights.
    dlnpf:     soft gates from a feature network initialised independently of the value network, both trained."""
    from ..regimes import REGIMES

    check_choice("regime", regime, REGIMES)
    if regime == "relu":
        d = from_module(model, example, tied=True)
        return d, list(d.parameters())
    src = model if regime == "flnpf" else copy.deepcopy(model)
    d = from_module(src, example, tied=False, gate="soft" if regime == "dlnpf" else "hard")
    d.reset_value(seed)
    if regime in ("frnpf-ii", "dlnpf"):
        if init_model is not None:
            d.feature.load_state_dict(init_model.state_dict())
        else:
            d.feature.load_state_dict(
                ModuleDGN(copy.deepcopy(src), d.ops, tied=False).reset_value(seed + 1).value.state_dict()
            )
    elif regime == "frnpf-di":
        d.feature.load_state_dict(d.value.state_dict())
    if regime == "dlnpf":
        return d, list(d.feature.parameters()) + list(d.value.parameters())
    d.freeze_features(True)
    return d, d.value_parameters()
