"""The infinite-width NPK of random ReLU gates (docs/THEORY.md §8): the baseline that learnt gates must beat.

Feature network: bias-free (or Gaussian biases of variance sigma_b^2), weights N(0, 2 / fan_in), width w -> infinity.
The pre-activations of a layer are then jointly Gaussian across units with the NNGP covariance of a ReLU network

    K_1(x, x') = 2 <x, x'> / d_in + sigma_b^2
    K_{l+1}(x, x') = sqrt(K_l(x, x) K_l(x', x')) (sin t_l + (pi - t_l) cos t_l) / pi + sigma_b^2,
    cos t_l = K_l(x, x') / sqrt(K_l(x, x) K_l(x', x'))

and a unit is on for both inputs with probability P(u > 0, v > 0) = (pi - t_l) / (2 pi) (Sheppard's formula for a
centred bivariate normal of correlation cos t_l). The overlaps concentrate, overlap_l(x, x') / w -> (pi - t_l)/(2 pi),
so the NPK of the paper's bias-free value paths, H = <x, x'> prod_l overlap_l, satisfies

    H(x, x') / w^(d-1)  ->  <x, x'> prod_{l=1}^{d-1} (pi - t_l) / (2 pi).

Without biases the first angle is that of x and x' and the recursion is the arc-cosine one of Cho & Saul (2009):
cos t_{l+1} = (sin t_l + (pi - t_l) cos t_l) / pi. On the diagonal t_l = 0 for every l: H(x, x) / w^(d-1) =
||x||^2 2^-(d-1), with or without biases. Off the diagonal, arccos near 1 amplifies rounding (arccos(1 - e) ~
sqrt(2e)): nearly parallel inputs carry a relative error up to ~1e-8 in float64. The diagonal of a symmetric
kernel (x1 only) is exact: there the angle is set to 0 rather than computed (found by the shared kernel battery,
which saw the computed diagonal off by ~1e-8 from the exact ``diag=True``). Cost: O(n1 n2 (d_in + depth)),
one GEMM and elementwise work; computed through the Gram engine.
"""

from __future__ import annotations

import math

import torch

from ..errors import NeuralpathError
from .gram import gram


def _features(x, sigma_b2):
    x = x.reshape(len(x), -1)
    d_in = x.shape[1]
    k = 2.0 * (x * x).sum(1) / d_in + sigma_b2  # K_1(x, x)
    return x, k, d_in


def _pair(a, b, depth, sigma_b2, diag=False):
    same = a is b  # a diagonal tile of the symmetric kernel: row i and column i are the same input
    (xa, ka, d_in), (xb, kb, _) = a, b
    ip = (xa * xb).sum(1, keepdim=True) if diag else xa @ xb.T  # <x, x'>
    K = 2.0 * ip / d_in + sigma_b2
    kaa = ka[:, None]
    kbb = kb[:, None] if diag else kb[None, :]
    H = ip.clone()
    for _ in range(depth - 1):
        norm = torch.sqrt(kaa * kbb)
        c = torch.where(norm > 0, K / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(K))
        if same and not diag:  # t = 0 exactly for x against itself (arccos of a rounded 1 is ~1e-8, not 0)
            c.diagonal().fill_(1.0)
        t = torch.arccos(c.clamp(-1.0, 1.0))
        H = H * (math.pi - t) / (2 * math.pi)
        K = norm * (torch.sin(t) + (math.pi - t) * torch.cos(t)) / math.pi + sigma_b2
        kaa, kbb = kaa + sigma_b2, kbb + sigma_b2  # K_{l+1}(x, x) = 2 E[relu(u)^2] + sigma_b^2 = K_l(x, x) + sigma_b^2
    return H


def npk_infinite(
    x1,
    x2=None,
    *,
    depth: int,
    bias_std: float = 0.0,
    diag: bool = False,
    dtype=torch.float64,
    block: int = 4096,
    out=None,
    progress: bool = False,
):
    """H(x1, x2) / w^(d-1) as w -> infinity for random ReLU gates (see the module docstring); (n1, n2), or the
    (n1,) diagonal with ``diag=True``. ``depth`` is the network's d (d-1 gated layers)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise NeuralpathError(f"depth={depth!r} must be an integer >= 2 (d-1 >= 1 gated layers)")
    if not (bias_std >= 0 and math.isfinite(bias_std)):
        raise NeuralpathError(f"bias_std={bias_std!r} must be a finite number >= 0")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and (not torch.is_tensor(x) or not bool(torch.isfinite(x).all())):
            raise NeuralpathError(f"{name} must be a finite tensor")
    if x1.dim() < 2 or (x2 is not None and (x2.dim() < 2 or math.prod(x1.shape[1:]) != math.prod(x2.shape[1:]))):
        raise NeuralpathError(
            f"x1 of shape {tuple(x1.shape)} and x2 of shape {None if x2 is None else tuple(x2.shape)}: pass batches "
            "(n, ...) with the same number of features per example"
        )
    s2 = float(bias_std) ** 2
    x1 = x1.to(dtype)
    if diag:  # the angle between x and itself is 0 at every layer (biases or not): P(u > 0) = 1/2 per layer
        return (x1.reshape(len(x1), -1) ** 2).sum(1) / 2 ** (depth - 1)
    x2 = None if x2 is None else x2.to(dtype)
    return gram(
        lambda x: _features(x.to(dtype), s2),
        lambda a, b: _pair(a, b, depth, s2),
        x1,
        x2,
        block=block,
        out=out,
        dtype=dtype,
        progress=progress,
        desc="infinite-width NPK",
    )
