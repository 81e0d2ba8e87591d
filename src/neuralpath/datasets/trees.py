"""Labels from an oblique decision tree: the synthetic benchmark of the deep linearly gated networks (ICLR 2025,
Banerjee, Ramaswamy, Yadav, Lakshminarayanan; written here from its description).

A complete binary tree of depth L = 4 (15 internal nodes, 16 leaves); internal node i has a hyperplane w_i ~ N(0, I_d)
normalised to unit length, bias 0. Inputs are uniform on the unit sphere of R^d (Gaussian draws, normalised). A
point goes from node i to its right child 2i + 2 where <w_i, x> > 0, else to the left child 2i + 1; the label of the
leaf it reaches is that leaf's node number mod 2 (leaves are nodes 15..30), so sibling leaves have opposite labels.
An optional margin drops points closer than ``margin`` to any node's hyperplane (0 in the headline sets).

The authors' exact points depend on numpy's legacy generator and their seed (365); ours are drawn from the same
distribution with numpy's default generator seeded 365, not the same points. Their train/test split is not stated:
ours is 80/20, stratified by label (seed 0).

| set | d | points |
|---|---|---|
| SD-I | 20 | 40,000 |
| SD-II | 100 | 60,000 |
| SD-III | 500 | 100,000 |
"""

from __future__ import annotations

import numpy as np

SETS = {"sd-i": (20, 40_000), "sd-ii": (100, 60_000), "sd-iii": (500, 100_000)}
DEPTH = 4


def tree(d: int, depth: int = DEPTH, seed: int = 365) -> np.ndarray:
    """(2^depth - 1, d) unit normals of the internal nodes, in the tree's node numbering."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2**depth - 1, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def leaf_of(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Node number of the leaf each row of x reaches (vectorised traversal)."""
    node = np.zeros(len(x), dtype=np.int64)
    n_internal = len(w)
    while (node < n_internal).any():
        inside = node < n_internal
        side = np.einsum("nd,nd->n", x[inside], w[node[inside]]) > 0
        node[inside] = 2 * node[inside] + np.where(side, 2, 1)
    return node


def generate(d: int, n: int, depth: int = DEPTH, seed: int = 365, margin: float = 0.0):
    """(x float32 (n, d) on the unit sphere, y int64 (n,) in {0, 1}, normals (2^depth - 1, d))."""
    w = tree(d, depth, seed)
    rng = np.random.default_rng([seed, 1])
    xs, left = [], n
    while left > 0:
        x = rng.standard_normal((max(left, 1024) * (2 if margin else 1), d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if margin:
            x = x[(np.abs(x @ w.T) >= margin).all(1)]
        xs.append(x[:left])
        left -= len(xs[-1])
    x = np.concatenate(xs)
    y = leaf_of(x, w) % 2
    return x.astype(np.float32), y.astype(np.int64), w


def split(y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Stratified (train, test) indices, sorted."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))
