"""Kernel machines on a precomputed kernel (NPK or NTK): Cholesky solves with a reported jitter, kernel ridge
regression, an SVM, and the kernel-target alignment.

Every solve is a Cholesky factorisation in float64. A kernel Gram matrix is PSD in exact arithmetic but can be
numerically singular (duplicate images, saturated gates): :func:`cholesky` adds the smallest jitter
j * mean(diag K), j in {0, 1e-12, 1e-11, ..., 1e-4}, that makes the factorisation succeed, and reports it. A matrix
that still fails (indefinite beyond round-off, NaN/inf) is an error naming the jitter tried. No explicit inverse
is ever formed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import NeuralpathError, check_choice

SYMMETRY_TOL = 1e-5  # relative: float32 kernels computed tile by tile stay far below it
JITTERS = (0.0,) + tuple(10.0**-e for e in range(12, 3, -1))


def _as64(K, name="K"):
    K = torch.as_tensor(np.asarray(K) if not torch.is_tensor(K) else K).to(torch.float64)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise NeuralpathError(f"{name} must be a square matrix, got shape {tuple(K.shape)}")
    if not torch.isfinite(K).all():
        raise NeuralpathError(f"{name} has NaN or inf entries; recompute it (float64, or a normalised kernel)")
    asym = float((K - K.T).abs().max()) if len(K) else 0.0
    if asym > SYMMETRY_TOL * max(float(K.abs().max()), 1e-300):  # Cholesky reads one triangle: the other is ignored
        raise NeuralpathError(
            f"{name} is not symmetric (max |K - K^T| = {asym:.3g}, relative {asym / float(K.abs().max()):.3g}); "
            "a kernel matrix of training points is K(x_i, x_j) for the same points on both sides"
        )
    return K


def labels(y, name="y") -> torch.Tensor:
    """Class labels as int64, refusing values that are not whole numbers (a float label was truncated silently)."""
    t = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y)
    if t.is_floating_point() or t.is_complex():
        frac = t.ne(t.round()) if not t.is_complex() else torch.ones_like(t, dtype=torch.bool)
        if bool(frac.any()):
            i = int(frac.nonzero()[0, 0])
            raise NeuralpathError(f"{name} must hold class labels 0..k-1; entry {i} is {t.flatten()[i].item()!r}")
    return t.long()


def _test_kernel(Kt, n, who) -> torch.Tensor:
    """A test-by-training kernel: (m, n), finite (a NaN row would argmax to an arbitrary class, silently)."""
    Kt = torch.as_tensor(np.asarray(Kt) if not torch.is_tensor(Kt) else Kt).to(torch.float64)
    if Kt.dim() != 2 or Kt.shape[1] != n:
        raise NeuralpathError(f"{who}: K_test_train must be (m, {n}) (test x training points), got {tuple(Kt.shape)}")
    if not torch.isfinite(Kt).all():
        raise NeuralpathError(f"{who}: K_test_train has NaN or inf entries; recompute it")
    return Kt


def cholesky(K, jitters=JITTERS):
    """(L, jitter): L L^T = K + jitter * mean(diag K) * I, with the smallest jitter that factorises."""
    K = _as64(K)
    scale = K.diagonal().abs().mean().item() or 1.0
    eye = torch.eye(K.shape[0], dtype=K.dtype)
    for j in jitters:
        L, info = torch.linalg.cholesky_ex(K + (j * scale) * eye if j else K)
        if int(info) == 0:
            return L, j
    raise NeuralpathError(
        f"the kernel matrix ({K.shape[0]} x {K.shape[0]}) is not positive definite even with "
        f"jitter {jitters[-1]:g} x mean(diag); it is indefinite or badly scaled (check for NaN "
        "gates, or use normalize='cosine')"
    )


def psd_solve(K, Y, jitters=JITTERS):
    """(X, jitter) with (K + jitter * mean(diag K) I) X = Y by Cholesky."""
    L, j = cholesky(K, jitters)
    Y = torch.as_tensor(Y, dtype=torch.float64)
    vec = Y.dim() == 1
    X = torch.cholesky_solve(Y[:, None] if vec else Y, L)
    return (X[:, 0] if vec else X), j


def quadratic_form_inverse(K, y, jitters=JITTERS):
    """(y^T K^-1 y, jitter) via a Cholesky solve: the nu_t of docs/THEORY.md §5 when K is the trace-normalised NPK."""
    L, j = cholesky(K, jitters)
    y = torch.as_tensor(y, dtype=torch.float64)
    z = torch.linalg.solve_triangular(L, y[:, None], upper=False)
    return float((z * z).sum()), j


def one_hot(y, k=None):
    y = torch.as_tensor(y).long()
    k = k or int(y.max()) + 1
    return torch.nn.functional.one_hot(y, k).double()


def alignment(K, y) -> float:
    """Kernel-target alignment <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F) with Y the one-hot labels (Cristianini et al.)."""
    K = _as64(K)
    y = labels(y)
    if y.dim() != 1 or len(y) != len(K) or len(y) == 0 or int(y.min()) < 0:
        raise NeuralpathError(
            f"alignment: y has shape {tuple(y.shape)} but K is {tuple(K.shape)}; give one label 0..k-1 per row of K"
        )
    Y = one_hot(y)
    T = Y @ Y.T
    return float((K * T).sum() / (K.norm() * T.norm()))


class KernelRidge:
    """One-vs-all kernel ridge regression on one-hot targets; the ridge is lam * mean(diag K_train)
    (scale-free, so raw NPKs of any depth work). ``fit`` picks lam from ``lams`` unless ``lam`` is given: fitted on
    90% and scored on 10% of a random subset of at most ``select_n`` training points (bounding the selection's cost)."""

    def __init__(self, lam: float | None = None, lams=(1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), select_n: int = 3000):
        def ridge_ok(v):
            return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v >= 0

        if lam is not None and not ridge_ok(lam):
            raise NeuralpathError(f"KernelRidge: lam={lam!r} must be a finite number >= 0 (or None: select it)")
        lams = tuple(lams)
        if lam is None and (not lams or not all(ridge_ok(v) for v in lams)):
            raise NeuralpathError(f"KernelRidge: lams={lams!r} must be one or more finite numbers >= 0")
        if isinstance(select_n, bool) or not isinstance(select_n, int) or select_n < 2:
            raise NeuralpathError(f"KernelRidge: select_n={select_n!r} must be an integer >= 2")
        self.lam, self.lams, self.select_n = lam, lams, select_n
        self._select = lam is None  # every fit selects lam anew (a refit on other data must not reuse the last one)
        self.holdout_acc: float | None = None

    def _solve(self, K, Y, lam):
        scale = K.diagonal().mean().item() or 1.0
        A = K + lam * scale * torch.eye(K.shape[0], dtype=K.dtype)
        return psd_solve(A, Y)

    def fit(self, K, y, seed: int = 0):
        K = _as64(K, "K_train")
        y = labels(y)
        if K.dim() != 2 or K.shape[0] != K.shape[1]:
            raise NeuralpathError(f"KernelRidge.fit: K_train must be a square (n, n) matrix, got {tuple(K.shape)}")
        if y.dim() != 1 or len(y) != K.shape[0]:
            raise NeuralpathError(
                f"KernelRidge.fit: y has shape {tuple(y.shape)} but K_train is {tuple(K.shape)}; "
                "give one label per row of K_train"
            )
        if len(y) < 2 or int(y.min()) < 0:
            raise NeuralpathError("KernelRidge.fit: needs at least 2 training points with labels 0..k-1")
        self.k = int(y.max()) + 1
        if self._select:
            n = min(len(y), self.select_n)
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
            hold, fit = perm[: max(1, n // 10)], perm[max(1, n // 10) :]
            best = (-1.0, None)
            for lam in self.lams:
                a, _ = self._solve(K[fit][:, fit], one_hot(y[fit], self.k), lam)
                acc = (K[hold][:, fit] @ a).argmax(1).eq(y[hold]).double().mean().item()
                if acc > best[0]:
                    best = (acc, lam)
            self.lam, self.holdout_acc = best[1], best[0]
        self.alpha, self.jitter = self._solve(K, one_hot(y, self.k), self.lam)
        return self

    def predict(self, K_test_train):
        if not hasattr(self, "alpha"):
            raise NeuralpathError("KernelRidge.predict was called before fit; call fit(K_train, y) first")
        Kt = _test_kernel(K_test_train, self.alpha.shape[0], "KernelRidge.predict")
        return (Kt @ self.alpha).argmax(1)


def svm(K_train, y, K_test_train, C: float = 1.0):
    """Predictions of scikit-learn's SVC on the precomputed kernel, normalised by mean(diag K_train)."""
    try:
        from sklearn.svm import SVC
    except ImportError as e:  # pragma: no cover - the kernels extra installs it
        raise NeuralpathError("the SVM needs scikit-learn: pip install 'neuralpath[kernels]'") from e
    K = _as64(K_train, "K_train")
    y = labels(y)
    if y.dim() != 1 or len(y) != len(K):
        raise NeuralpathError(f"svm: y has shape {tuple(y.shape)} but K_train is {tuple(K.shape)}")
    if len(torch.unique(y)) < 2:
        raise NeuralpathError("svm: the training labels hold one class only; an SVM needs at least two")
    Kt = _test_kernel(K_test_train, len(K), "svm")
    s = K.diagonal().mean().item() or 1.0
    clf = SVC(C=C, kernel="precomputed").fit((K / s).numpy(), y.numpy())
    return torch.from_numpy(clf.predict((Kt / s).numpy()))


def fit_predict(method, K_train, y_train, K_test_train):
    check_choice("method", method, ("krr", "svm"))
    if method == "svm":
        return svm(K_train, y_train, K_test_train), {}
    m = KernelRidge().fit(K_train, y_train)
    return m.predict(K_test_train), {"lam": m.lam, "jitter": m.jitter, "holdout_acc": m.holdout_acc}


def accuracy(pred, y) -> float:
    pred, y = torch.as_tensor(pred), torch.as_tensor(y)
    if pred.shape != y.shape or pred.numel() == 0:
        raise NeuralpathError(
            f"accuracy: predictions of shape {tuple(pred.shape)} against labels of shape {tuple(y.shape)}; "
            "give one prediction per label (at least one)"
        )
    return float(pred.eq(y).double().mean())


__all__ = [
    "cholesky",
    "psd_solve",
    "quadratic_form_inverse",
    "alignment",
    "KernelRidge",
    "svm",
    "fit_predict",
    "accuracy",
    "JITTERS",
]
