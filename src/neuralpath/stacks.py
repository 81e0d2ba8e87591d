"""Stacks: R networks (the runs of a table row: regimes x seeds) that take one optimiser step together.

The training engine (:mod:`neuralpath.train`) never sees a single network: it trains a *stack* of R runs, each with
its own initialisation, regime, data order and subset, and R = 1 is a single run. Nothing is shared between runs but
the step: the loss is the sum over runs of each run's own mean loss, so each run's gradient is its own, and Adam, SGD
and RMSprop are elementwise, so one optimiser over all runs' parameters is R independent optimisers.

Two implementations behind one interface (``forward(xs, rows) -> (R, B, k)``, ``forward_shared(x)``, ``parameters()``,
``state_dict_of(r)``, ``load_state_dict_of(r, sd)``, ``tensors()``):

- :class:`LoopStack` (every architecture): the R networks themselves, run one after the other inside the step.
  On this CPU a single conv network at the paper's widths and at 1/2 and 1/4 of them already runs its convolutions at
  or near the large-GEMM rate, while stacking the runs of a conv row as one grouped convolution (groups = R) was slower
  at every width measured (``python -m benchmarks convstep``; docs/PERFORMANCE.md), so the loop is the fast design.
- :class:`FCStack` (fully connected nets of one shape): each layer of all R runs is one batched product
  (R, B, in) x (R, in, out) (``torch.baddbmm``); for the paper's FC 6x128 at batch 32 the step is launch-bound, and
  batching the runs is 4.45x faster than running them one by one (docs/PERFORMANCE.md). Tested equal to
  :class:`LoopStack` (float64, 1e-10).

Frozen gates (FLNPF, FRNPF-II, FRNPF-DI) never change during training: both stacks compute them once for every
training row (:meth:`cache_frozen_gates`) and look them up per batch, so a frozen-gate step is the value network's
forward and backward only. :class:`LoopStack` keeps them bit-packed (8 gates a byte: 50,000 CIFAR-10 images x
393,216 conv gates of the full-width GCONV are 2.5 GB), :class:`FCStack` as bytes (60,000 x 640 per run).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import NeuralpathError
from .nets import FCDGN

# kinds of regimes: the order in which an FCStack keeps its runs
TIED, FROZEN, SOFT = 0, 1, 2


def regime_kind(net) -> int:
    """TIED (the ReLU net), FROZEN (hard gates from a frozen feature network) or SOFT/trained feature network."""
    if getattr(net, "tied", False):
        return TIED
    if getattr(net, "features_frozen", False):
        return FROZEN
    return SOFT


# -- bit-packed gates ----------------------------------------------------------------------------------------------
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(g: torch.Tensor) -> torch.Tensor:
    """(n, ...) bool -> (n, ceil(m / 8)) uint8, m = the product of the trailing sizes; bit j of byte i is gate 8i+j."""
    n = g.shape[0]
    flat = g.reshape(n, -1)
    m = flat.shape[1]
    pad = (-m) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(n, pad)], 1)
    bits = flat.view(n, -1, 8).to(torch.uint8) << _SHIFTS.to(flat.device)  # (n, m/8, 8)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_bits(p: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (b, nbytes) uint8 -> (b, *shape) of 0/1 in ``dtype``."""
    b = p.shape[0]
    m = 1
    for s in shape:
        m *= s
    bits = (p.unsqueeze(-1) >> _SHIFTS.to(p.device)) & 1  # (b, nbytes, 8)
    return bits.view(b, -1)[:, :m].to(dtype).view(b, *shape)


def _gates_are_bits(net) -> bool:
    """True when every gate of ``net`` is 0 or 1 (hard gates, no max-pool routing or leaky slope): only then can its
    frozen gates be kept as bits. A frozen *soft*-gate network (e.g. a DLNPF net frozen after training) is not."""
    return getattr(net, "gate_kind", "hard") == "hard" and getattr(net, "gate_cache_ok", True)


class LoopStack:
    """R deep gated networks of any architecture, each run forward in turn; one autograd graph, one backward."""

    def __init__(self, nets):
        if not nets:
            raise NeuralpathError("a stack needs at least one network")
        self.nets = list(nets)
        self.R = len(self.nets)
        self.kinds = [regime_kind(n) for n in self.nets]
        # per frozen run: (row map (N,), [(packed (n, bytes), shape)] per layer)
        self._gates: list[Any] = [None] * self.R
        self._forward: list[Any] = list(self.nets)  # what computes run r's training output (the net, or compiled)

    def compile_runs(self, flags):
        """``torch.compile`` (inductor) the training forward of the runs flagged, each a network whose feature network
        trains (DLNPF): GCONV's step went from 2.2-2.3x to 2.04-2.09x the ReLU step on a Zen 1, VCONV's from 2.15-2.21x
        to 2.00-2.05x on a Zen 4 (docs/PERFORMANCE.md).
        Evaluation stays eager (its batch shapes would each compile again)."""
        for r, f in enumerate(flags):
            if f:
                if self.kinds[r] != SOFT:
                    raise NeuralpathError("compile is for runs whose feature network trains (DLNPF)")
                self._forward[r] = torch.compile(self.nets[r])

    def parameters(self):
        """The trainable parameters of every run (frozen feature networks excluded), in a fixed order."""
        return [p for n in self.nets for p in n.parameters() if p.requires_grad]

    def tensors(self):
        """Every parameter and buffer of every run: the state a resume restores."""
        return [t for n in self.nets for t in n.state_dict(keep_vars=True).values() if torch.is_tensor(t)]

    def to(self, device):
        for n in self.nets:
            n.to(device)
        return self

    def train(self, mode: bool = True):
        for n in self.nets:
            n.train(mode)
        return self

    def state_dict_of(self, r: int) -> dict:
        return _detached(self.nets[r].state_dict())

    def sync(self):
        """The networks are the runs themselves: nothing to copy back."""

    def load_state_dict_of(self, r: int, sd: dict):
        self.nets[r].load_state_dict(sd)

    @torch.no_grad()
    def cache_frozen_gates(self, x: torch.Tensor, rows_per_run, batch: int = 64):
        """Compute, once, the gates of every frozen run on its training rows ``x[rows_per_run[r]]``, bit-packed."""
        for r, net in enumerate(self.nets):
            if self.kinds[r] != FROZEN or not _gates_are_bits(net):
                continue  # (soft gates, max-pool routing and leaky gates are not 0/1 bits: recomputed per batch)
            rows = rows_per_run[r]
            rowmap = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
            rowmap[rows] = torch.arange(len(rows), device=x.device)
            packed = None
            for i in range(0, len(rows), batch):
                gs = net.gates(x[rows[i : i + batch]])
                if packed is None:
                    packed = [
                        (
                            torch.empty(len(rows), (g[0].numel() + 7) // 8, dtype=torch.uint8, device=x.device),
                            tuple(g.shape[1:]),
                        )
                        for g in gs
                    ]
                for (buf, _), g in zip(packed, gs):
                    buf[i : i + len(g)] = pack_bits(g > 0)
            self._gates[r] = (rowmap, packed)

    def cached_gates_nbytes(self) -> int:
        return sum(buf.numel() for c in self._gates if c is not None for buf, _ in c[1])

    def forward(self, xs, rows=None):
        """xs: (R, B, ...), one batch per run; rows: their indices into the training set (R, B), which select the
        cached gates of the frozen runs. Returns (R, B, k)."""
        outs = []
        for r, net in enumerate(self.nets):
            cache = self._gates[r]
            if cache is not None and rows is not None:
                rowmap, packed = cache
                pos = rowmap[rows[r]]
                gates = [unpack_bits(buf[pos], shape, xs.dtype) for buf, shape in packed]
                outs.append(net.value_forward(xs[r], gates))
            else:
                outs.append(self._forward[r](xs[r]))
        return torch.stack(outs)

    def forward_shared(self, x):
        """The same inputs x (N, ...) through every run: (R, N, k)."""
        return torch.stack([net(x) for net in self.nets])


class FCStack:
    """R fully connected DGNs of one shape as stacked tensors (see the module docstring).

    Runs are kept in the order tied, frozen, soft (``order``: the stack position of each given net)."""

    def __init__(self, nets):
        kinds = [regime_kind(n) for n in nets]
        self.order = sorted(range(len(nets)), key=lambda i: kinds[i])  # stack position -> given index
        self.pos = {g: s for s, g in enumerate(self.order)}
        nets = [nets[i] for i in self.order]
        kinds = [kinds[i] for i in self.order]
        self.R = len(nets)
        self.nt, self.nf, self.ns = kinds.count(TIED), kinds.count(FROZEN), kinds.count(SOFT)
        n0 = nets[0]
        self.depth, self.out_dim, self.has_bias = n0.depth, n0.out_dim, n0.has_bias
        self.beta, self.eps = nets[-1].beta, nets[-1].eps
        self.templates = nets

        def stack(mods, trainable):  # weights stored transposed, (R, in, out): the weight gradient lands without a copy
            w = torch.stack([m.weight.detach().t() for m in mods]).contiguous().requires_grad_(trainable)
            b = (
                torch.stack([m.bias.detach() for m in mods]).clone().requires_grad_(trainable)
                if self.has_bias
                else None
            )
            return [w, b]

        self.value = [stack([n.value_layers[l] for n in nets], True) for l in range(self.depth)]
        fro = nets[self.nt : self.nt + self.nf]
        self.frozen = [stack([n.feature_layers[l] for n in fro], False) for l in range(self.depth - 1)] if fro else []
        soft = nets[self.nt + self.nf :]
        self.soft = [stack([n.feature_layers[l] for n in soft], True) for l in range(self.depth - 1)] if soft else []
        self._table = None

    @staticmethod
    def compatible(nets) -> bool:
        """True when the nets can share an FCStack: FC DGNs of one shape, bias and gate settings."""
        if not all(type(n) is FCDGN and n.gating == "relu" and n.value_input == "x" for n in nets):
            return False  # the stacked forward is the paper's DGN (ReLU gating network, value input x)
        keys = {(n.in_dim, n.width, n.depth, n.out_dim, n.has_bias) for n in nets}
        soft = {(n.beta, n.eps) for n in nets if regime_kind(n) == SOFT}
        hard_ok = all(n.gate_kind == "hard" for n in nets if regime_kind(n) != SOFT)
        soft_ok = all(n.gate_kind == "soft" for n in nets if regime_kind(n) == SOFT)
        dtypes = {next(n.parameters()).dtype for n in nets}
        return len(keys) == 1 and len(soft) <= 1 and hard_ok and soft_ok and len(dtypes) == 1

    def _groups(self):
        return (self.value, self.frozen, self.soft)

    def compile_runs(self, flags):
        raise NeuralpathError("compile is for conv networks run one by one; an FC stack is batched products already")

    def parameters(self):
        return [t for wb in self.value + self.soft for t in wb if t is not None]

    def tensors(self):
        return [t for g in self._groups() for wb in g for t in wb if t is not None]

    def to(self, device):
        for group in self._groups():
            for i, (w, b) in enumerate(group):
                rg = w.requires_grad
                group[i] = [
                    w.detach().to(device).requires_grad_(rg),
                    None if b is None else b.detach().to(device).requires_grad_(rg),
                ]
        return self

    def train(self, mode: bool = True):
        return self

    @staticmethod
    def _lin(x, wb):
        w, b = wb
        if x.dim() == 2:  # shared inputs (evaluation): (N, D) -> (R, N, out)
            y = torch.matmul(x, w)
            return y if b is None else y + b[:, None, :]
        if b is None:
            return torch.bmm(x, w)
        return torch.baddbmm(b[:, None, :], x, w)

    @torch.no_grad()
    def cache_frozen_gates(self, x, rows_per_run, batch: int = 4096):
        """Gates of the frozen runs on every row of x (N, D) as bool (R_frozen, N, d-1, width): looked up per batch."""
        if not self.nf:
            return
        x = x.flatten(1)
        chunks = []
        for i in range(0, len(x), batch):
            f = x[i : i + batch]
            gs = []
            for l in range(self.depth - 1):
                q = self._lin(f, self.frozen[l])
                gs.append(q > 0)
                f = torch.relu(q)
            chunks.append(torch.stack(gs, 2))  # (Rf, b, d-1, w)
        self._table = torch.cat(chunks, 1)

    def cached_gates_nbytes(self) -> int:
        return 0 if self._table is None else self._table.numel()

    def forward(self, xs, rows=None):
        """xs: (R, B, ...) one batch per run, in the order the nets were given; rows (R, B): their indices into the
        training set (selects the cached frozen gates). Returns (R, B, k) in the given order."""
        x = xs.flatten(2)[self.order]
        fg = None
        if self.nf and rows is not None and self._table is not None:
            idx = rows[self.order][self.nt : self.nt + self.nf]  # (Rf, B)
            fg = self._table[torch.arange(self.nf, device=idx.device)[:, None], idx]  # (Rf, B, d-1, w)
        return self._run(x, fg, shared=False)[self._inverse(xs.device)]

    def forward_shared(self, x):
        """The same inputs x (N, ...) through every run: (R, N, k) in the given order."""
        return self._run(x.flatten(1), None, shared=True)[self._inverse(x.device)]

    def _inverse(self, device):
        inv = torch.empty(self.R, dtype=torch.long)
        inv[torch.tensor(self.order)] = torch.arange(self.R)
        return inv.to(device)

    def _run(self, x, fg, shared):
        nt, nf, ns = self.nt, self.nf, self.ns
        h = x
        ff = (x if shared else x[nt : nt + nf]) if nf and fg is None else None
        fs = (x if shared else x[nt + nf :]) if ns else None
        for l in range(self.depth - 1):
            pv = self._lin(h, self.value[l])
            gates = []
            if nt:
                gates.append((pv[:nt].detach() > 0).to(pv.dtype))
            if nf and fg is not None:
                gates.append(fg[:, :, l].to(pv.dtype))
            elif nf:
                with torch.no_grad():
                    q = self._lin(ff, self.frozen[l])
                    gates.append((q > 0).to(pv.dtype))
                    ff = torch.relu(q)
            if ns:
                q = self._lin(fs, self.soft[l])
                gates.append((1.0 + self.eps) * torch.sigmoid(self.beta * q))
                fs = torch.relu(q)
            h = pv * (gates[0] if len(gates) == 1 else torch.cat(gates, 0))
        return self._lin(h, self.value[-1])

    def _layers_of(self, s):
        """(value layers, feature layers or None) of stack position s, as (group, index) pairs."""
        if s < self.nt:
            return None
        if s < self.nt + self.nf:
            return self.frozen, s - self.nt
        return self.soft, s - self.nt - self.nf

    def state_dict_of(self, r: int) -> dict:
        """Run r (given order) as the state_dict of its own DGN (the format a single run writes)."""
        s = self.pos[r]
        net = self.templates[s]
        with torch.no_grad():
            for l in range(self.depth):
                net.value_layers[l].weight.copy_(self.value[l][0][s].t())
                if self.has_bias:
                    net.value_layers[l].bias.copy_(self.value[l][1][s])
            feat = self._layers_of(s)
            if feat is not None:
                group, j = feat
                for l in range(self.depth - 1):
                    net.feature_layers[l].weight.copy_(group[l][0][j].t())
                    if self.has_bias:
                        net.feature_layers[l].bias.copy_(group[l][1][j])
        return _detached(net.state_dict())

    def sync(self):
        """Copy every run's stacked weights back into its own network (the nets the stack was built from)."""
        for r in range(self.R):
            self.state_dict_of(r)

    def load_state_dict_of(self, r: int, sd: dict):
        s = self.pos[r]
        with torch.no_grad():
            for l in range(self.depth):
                self.value[l][0][s].copy_(sd[f"value_layers.{l}.weight"].t())
                if self.has_bias:
                    self.value[l][1][s].copy_(sd[f"value_layers.{l}.bias"])
            feat = self._layers_of(s)
            if feat is not None:
                group, j = feat
                for l in range(self.depth - 1):
                    group[l][0][j].copy_(sd[f"feature_layers.{l}.weight"].t())
                    if self.has_bias:
                        group[l][1][j].copy_(sd[f"feature_layers.{l}.bias"])


def _detached(sd: dict) -> dict:
    """A CPU copy of a state_dict (tensors cloned; the network's configuration entry kept as it is)."""
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in sd.items()}


def make_stack(nets, fast: bool = True):
    """An FCStack when the nets allow it (and ``fast``), else a LoopStack."""
    if fast and len(nets) > 1 and FCStack.compatible(nets):
        return FCStack(nets)
    return LoopStack(nets)
