"""How the gates change during training: the instruments behind ``reproduce gates`` (docs/THEORY.md §10).

- :func:`flip_fraction`: per layer, the fraction of (input, unit) gates that differ between two networks (e.g. two
  checkpoints) on a fixed probe set.
- :func:`distinct_patterns`: per layer and for the whole network, the number of distinct activation patterns
  (rows of the binary gate matrix) over a set of inputs: how finely the gates partition the data.
- :func:`class_overlap`: per layer, a k x k matrix: the mean normalised overlap <g_x, g_x'> / sqrt(|g_x| |g_x'|) of
  the active sub-networks of inputs of class i and class j (diagonal: distinct pairs of one class).
- :func:`regions_along_segment`: the exact number of linear regions a fully connected ReLU-gated network crosses on
  the segment between two inputs. Along x(t) = (1 - t) a + t b, layer 1's pre-activations are affine in t, so its
  gates change only at the roots of those affine functions; within each interval where layers 1..l-1 keep their
  pattern, layer l's pre-activations are affine in t again. Splitting the intervals layer by layer at those roots
  gives every pattern change (float64; a root closer than 1e-12 to an interval's end is not a new region).
  Hanin and Rolnick (arXiv 1906.00904) show that at initialisation the expected count along a line grows with the
  number of neurons, not with depth.
"""

from __future__ import annotations

import torch

from .errors import NeuralpathError
from .nets import FCDGN


@torch.no_grad()
def hard_gates(net, x):
    """Binary gates per layer, (n, units) bool (the sign of each pre-activation of the feature network)."""
    qs, _ = net.feature_forward(x)
    return [(q > 0).reshape(len(x), -1) for q in qs]


def _same_layout(gates_a, gates_b, who):
    shapes = [tuple(g.shape) for g in gates_a], [tuple(g.shape) for g in gates_b]
    if shapes[0] != shapes[1]:
        raise NeuralpathError(f"{who}: the two gate lists differ ({shapes[0]} vs {shapes[1]}); compare the gates "
                              "of one network's layers on the same inputs")  # fmt: skip


def flip_fraction(gates_a, gates_b):
    """Per layer: the fraction of gates that differ between two gate lists of the same layout."""
    _same_layout(gates_a, gates_b, "flip_fraction")
    return [float((a != b).float().mean()) for a, b in zip(gates_a, gates_b)]


def distinct_patterns(gates):
    """(per layer counts, whole-network count) of distinct rows."""
    per = [int(torch.unique(g.to(torch.uint8), dim=0).shape[0]) for g in gates]
    whole = int(torch.unique(torch.cat([g.to(torch.uint8) for g in gates], 1), dim=0).shape[0])
    return per, whole


def class_overlap(gates, y, k: int | None = None):
    """Per layer: (k, k) mean normalised overlap of active sub-networks between classes."""
    from .kernels.machines import labels

    y = labels(y)
    bad = [tuple(g.shape) for g in gates if len(g) != len(y)]
    if y.dim() != 1 or bad or (len(y) and int(y.min()) < 0):
        raise NeuralpathError(
            f"class_overlap: y has shape {tuple(y.shape)} but the gates are {bad or [tuple(g.shape) for g in gates]}; "
            "give one label 0..k-1 per input row"
        )
    k = k or int(y.max()) + 1
    out = []
    onehot = torch.nn.functional.one_hot(y, k).double()  # (n, k)
    counts = onehot.sum(0)
    for g in gates:
        g = g.double()
        norm = g.sum(1).clamp_min(1).sqrt()
        gn = g / norm[:, None]
        S = gn @ gn.T  # (n, n) normalised overlaps
        tot = onehot.T @ S @ onehot  # sums over class pairs
        diag_self = (onehot * S.diagonal()[:, None]).sum(0)  # self pairs, excluded on the diagonal
        pairs = counts[:, None] * counts[None, :]
        M = tot.clone()
        M.diagonal().sub_(diag_self)
        pairs.diagonal().sub_(counts)
        out.append(M / pairs.clamp_min(1))
    return out


@torch.no_grad()
def regions_along_segment(net: FCDGN, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> int:
    """Exact number of linear regions (distinct gate patterns of all layers) crossed from a to b."""
    if not isinstance(net, FCDGN) or net.gating != "relu":
        raise NeuralpathError("regions_along_segment needs a fully connected network with a ReLU gating network")
    net = net.double()
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if len(a) != net.in_dim or len(b) != net.in_dim or not bool(torch.isfinite(torch.cat([a, b])).all()):
        raise NeuralpathError(
            f"regions_along_segment: a and b must be finite points of the input space ({net.in_dim} values each), "
            f"got {len(a)} and {len(b)}"
        )
    # intervals with the pattern of the layers so far constant: the layer input at their two ends (affine between)
    z0, z1 = a[None], b[None]
    for layer in net.feature_layers:
        q0, q1 = layer(z0), layer(z1)  # (m, w): affine in t on each interval
        with torch.no_grad():
            r = q0 / (q0 - q1)
            r = torch.where((q0 * q1 < 0) & (r > tol) & (r < 1 - tol), r, torch.full_like(r, 2.0))
        parent, u0, u1 = [], [], []
        for i, row in enumerate(r.tolist()):  # split each interval at the roots inside it
            pts = [0.0] + sorted({x for x in row if x < 1.5}) + [1.0]
            parent += [i] * (len(pts) - 1)
            u0 += pts[:-1]
            u1 += pts[1:]
        parent = torch.tensor(parent)
        u0 = torch.tensor(u0, dtype=z0.dtype)[:, None]
        u1 = torch.tensor(u1, dtype=z0.dtype)[:, None]
        qa = q0[parent] + u0 * (q1 - q0)[parent]
        qb = q0[parent] + u1 * (q1 - q0)[parent]
        g = ((qa + qb) / 2 > 0).to(qa.dtype)  # the pattern inside each new interval
        z0, z1 = qa * g, qb * g
    return len(z0)
