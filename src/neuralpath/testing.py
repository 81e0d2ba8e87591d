"""A test battery every kernel of neuralpath must pass (in the manner of GPyTorch's kernel test base class).

Subclass :class:`KernelTestBase` in a pytest module, set ``kernel(net, x1, x2=None, **kw)``, ``cases()`` (triples
of a small network and two input sets) and ``methods`` (the kernel's implementations), and the checks below run for
the new kernel: symmetry, positive semi-definiteness, K(x1, x2) = K(x2, x1)^T, blocked == unblocked, the diagonal
(``diag=True``) equals the full kernel's, and every method agrees with every other. Tolerances come from one table,
by dtype (:data:`TOL`).
"""

from __future__ import annotations

import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # relative, against the largest entry


class KernelTestBase:
    rtol = None  # None: from TOL by the network's dtype
    methods: tuple = ()

    def kernel(self, net, x1, x2=None, **kw):  # pragma: no cover - to override
        raise NotImplementedError

    def cases(self):  # pragma: no cover - to override
        raise NotImplementedError

    def _close(self, a, b):
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
        tol = self.rtol if self.rtol is not None else TOL.get(a.dtype, 1e-5)
        assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale

    def test_diag(self):
        for net, x, _ in self.cases():
            self._close(self.kernel(net, x, diag=True), self.kernel(net, x).diagonal())

    def test_methods_agree(self):
        for net, x, x2 in self.cases():
            ref = self.kernel(net, x, x2)
            for m in self.methods:
                self._close(self.kernel(net, x, x2, method=m), ref)

    def test_symmetric(self):
        for net, x, _ in self.cases():
            K = self.kernel(net, x)
            self._close(K, K.T)

    def test_psd(self):
        for net, x, _ in self.cases():
            K = self.kernel(net, x)
            ev = torch.linalg.eigvalsh((K + K.T) / 2)
            assert ev.min().item() >= -1e-9 * max(ev.max().item(), 1.0)

    def test_transpose(self):
        for net, x, x2 in self.cases():
            self._close(self.kernel(net, x, x2), self.kernel(net, x2, x).T)

    def test_cross_block_consistent(self):
        for net, x, x2 in self.cases():
            full = self.kernel(net, torch.cat([x, x2]))
            self._close(self.kernel(net, x, x2), full[: len(x), len(x) :])

    def test_blocked_equals_unblocked(self):
        for net, x, x2 in self.cases():
            self._close(self.kernel(net, x, block=3), self.kernel(net, x, block=10_000))
            self._close(self.kernel(net, x, x2, block=2), self.kernel(net, x, x2, block=10_000))
