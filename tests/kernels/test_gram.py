"""The Gram engine (kernels/gram.py) on its own: both of its paths (features kept for every tile when they fit the
budget, or recomputed per tile) give the kernel of a direct computation, symmetric or not, and the kept path
featurises every input once."""

import torch

from neuralpath.kernels.gram import gram


def test_both_feature_paths_give_the_direct_kernel():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(11, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    seen = []

    def featurize(x):
        seen.append(len(x))
        return torch.tanh(x)

    def pair(a, b):
        return a @ b.T

    for other, direct in ((None, torch.tanh(x1) @ torch.tanh(x1).T), (x2, torch.tanh(x1) @ torch.tanh(x2).T)):
        for per_input in (None, 32):  # None: recompute per tile; 32 bytes per input: all kept
            seen.clear()
            K = gram(featurize, pair, x1, other, block=3, dtype=torch.float64, feature_bytes_per_input=per_input)
            assert (K - direct).abs().max().item() <= 1e-14
            inputs = len(x1) + (0 if other is None else len(other))
            assert (sum(seen) == inputs) == (per_input is not None), (per_input, sum(seen), inputs)
