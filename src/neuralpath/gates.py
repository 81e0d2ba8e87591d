"""Gates of a deep gated network (docs/THEORY.md §3).

hard:  G = 1{q > 0}                      no gradient flows through it (the indicator is flat a.e.)
soft:  G = (1 + eps) * sigmoid(beta * q) gradient flows into the feature network
The authors use beta = 4 and eps = 0.1 in every soft-gate run.
"""

from __future__ import annotations

import torch

from .errors import check_choice

GATES = ("hard", "soft")


def hard_gate(q: torch.Tensor) -> torch.Tensor:
    """1{q > 0} in q's dtype, detached: a hard gate passes no gradient to the feature network."""
    return (q.detach() > 0).to(q.dtype)


def soft_gate(q: torch.Tensor, beta: float = 4.0, eps: float = 0.1) -> torch.Tensor:
    """(1 + eps) * sigmoid(beta * q); differentiable in q."""
    return (1.0 + eps) * torch.sigmoid(beta * q)


def gate_fn(kind: str, beta: float = 4.0, eps: float = 0.1):
    check_choice("gate", kind, GATES)
    if kind == "hard":
        return hard_gate
    return lambda q: soft_gate(q, beta, eps)
