"""Vectorised training of many fully connected runs at once (the runs of a table row: regimes x seeds).

A table row is 25 runs of a small network (FC 6x128) at batch 32: run one at a time, each optimiser step is a few
tiny matrix products and the time goes to Python and kernel-launch overhead. Here the R runs of a row share every
step: each layer is one batched matrix product (R, B, in) x (R, in, out) — ``torch.baddbmm`` — and one optimiser owns
the stacked weights. Nothing is shared between runs but the step:

- every run keeps its own data order (``train.epoch_order(n, seed, epoch)``), initialisation (``build_regime`` with its
  seed) and gates: tied ReLU runs gate on their own pre-activations, frozen runs (FLNPF, FRNPF-II, FRNPF-DI) on a
  frozen feature network evaluated without autograd, DLNPF runs on a trained soft-gated feature network;
- the loss is the sum over runs of each run's mean cross-entropy, so each run's gradient is its own;
- Adam and SGD are elementwise, so one optimiser over the stacked tensors is R independent optimisers.

The result is the same training as ``train.train`` run by run, up to float rounding of the batched products (tested).
Each run writes the same folder as ``train.train`` (config.json, metrics.jsonl, best.pt, result.json) so FLNPF,
``kernel --checkpoint`` and the tables read them alike. The ensemble's own state (all runs, the optimiser, the epoch)
is one atomic checkpoint, so a killed ensemble resumes to the same result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoints, datasets
from .errors import NeuralpathError
from .io import append_jsonl, read_jsonl, write_json, write_text
from .regimes import build_regime
from .train import (TrainConfig, clean_accuracy, epoch_order, load_relu_state, load_test, load_train_full,
                    net_kwargs, resolve_device, train_val_indices, versions)

SHARED = ("arch", "dataset", "optimizer", "lr", "epochs", "batch_size", "width", "depth", "limit_train",
          "limit_test", "val_split", "data_root", "device")
KIND_ORDER = {"relu": 0, "flnpf": 1, "frnpf-ii": 1, "frnpf-di": 1, "dlnpf": 2}


class FCEnsemble:
    """R fully connected DGNs of one shape, stacked. ``nets`` come from ``build_regime`` (one per run) in
    tied / frozen / soft order; the stacked tensors start as copies of their weights."""

    def __init__(self, nets, regimes):
        kinds = [KIND_ORDER[r] for r in regimes]
        if kinds != sorted(kinds):
            raise NeuralpathError("FCEnsemble: runs must be ordered relu, frozen (flnpf/frnpf), dlnpf")
        self.R = len(nets)
        self.nt, self.nf = kinds.count(0), kinds.count(1)
        self.ns = kinds.count(2)
        n0 = nets[0]
        self.depth, self.out_dim = n0.depth, n0.out_dim
        self.beta, self.eps = nets[-1].beta, nets[-1].eps

        def stack(mods):  # weights stored transposed, (R, in, out): the weight gradient lands without a copy
            return [torch.stack([m.weight.detach().t() for m in mods]).contiguous(),
                    torch.stack([m.bias.detach() for m in mods]).clone()]
        self.value = [stack([n.value_layers[l] for n in nets]) for l in range(self.depth)]
        for w, b in self.value:
            w.requires_grad_(True)
            b.requires_grad_(True)
        fro = nets[self.nt:self.nt + self.nf]
        self.frozen = [stack([n.feature_layers[l] for n in fro]) for l in range(self.depth - 1)] if fro else []
        soft = nets[self.nt + self.nf:]
        self.soft = [stack([n.feature_layers[l] for n in soft]) for l in range(self.depth - 1)] if soft else []
        for w, b in self.soft:
            w.requires_grad_(True)
            b.requires_grad_(True)
        self.templates = nets

    def parameters(self):
        return [t for wb in self.value + self.soft for t in wb]

    def tensors(self):
        return [t for wb in self.value + self.frozen + self.soft for t in wb]

    def to(self, device):
        for group in (self.value, self.frozen, self.soft):
            for i, (w, b) in enumerate(group):
                rg = w.requires_grad
                group[i] = [w.detach().to(device).requires_grad_(rg), b.detach().to(device).requires_grad_(rg)]
        return self

    @staticmethod
    def _lin(x, wb):
        w, b = wb
        if x.dim() == 2:  # shared inputs (evaluation): (N, D) -> (R, N, out)
            return torch.matmul(x, w) + b[:, None, :]
        return torch.baddbmm(b[:, None, :], x, w)

    @torch.no_grad()
    def frozen_gate_table(self, x, batch: int = 4096):
        """Gates of the frozen runs on every row of x (N, D): (R_frozen, N, d-1, width) bool. Frozen gates never
        change during training, so they are computed once and looked up per batch instead of recomputed."""
        chunks = []
        for i in range(0, len(x), batch):
            f = x[i:i + batch]
            gs = []
            for l in range(self.depth - 1):
                q = self._lin(f, self.frozen[l])
                gs.append(q > 0)
                f = torch.relu(q)
            chunks.append(torch.stack(gs, 2))  # (Rf, b, d-1, w)
        return torch.cat(chunks, 1)

    def forward(self, x, frozen_gates=None):
        """x: (R, B, D) (one batch per run) or (N, D) (the same inputs for every run). Returns (R, B, k).
        ``frozen_gates``: the frozen runs' gates for these rows, (R_frozen, B, d-1, width) bool, from
        :meth:`frozen_gate_table`; None computes them."""
        nt, nf, ns = self.nt, self.nf, self.ns
        h = x
        ff = (x if x.dim() == 2 else x[nt:nt + nf]) if nf and frozen_gates is None else None
        fs = (x if x.dim() == 2 else x[nt + nf:]) if ns else None
        for l in range(self.depth - 1):
            pv = self._lin(h, self.value[l])
            gates = []
            if nt:
                gates.append((pv[:nt].detach() > 0).to(pv.dtype))
            if nf and frozen_gates is not None:
                gates.append(frozen_gates[:, :, l].to(pv.dtype))
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

    def state_dict_of(self, r: int) -> dict:
        """Run r as the state_dict of its own DGN (the format ``train.train`` writes)."""
        net = self.templates[r]
        with torch.no_grad():
            for l in range(self.depth):
                net.value_layers[l].weight.copy_(self.value[l][0][r].t())
                net.value_layers[l].bias.copy_(self.value[l][1][r])
            if self.nt <= r < self.nt + self.nf:
                for l in range(self.depth - 1):
                    net.feature_layers[l].weight.copy_(self.frozen[l][0][r - self.nt].t())
                    net.feature_layers[l].bias.copy_(self.frozen[l][1][r - self.nt])
            elif r >= self.nt + self.nf:
                for l in range(self.depth - 1):
                    net.feature_layers[l].weight.copy_(self.soft[l][0][r - self.nt - self.nf].t())
                    net.feature_layers[l].bias.copy_(self.soft[l][1][r - self.nt - self.nf])
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def evaluate(ens: FCEnsemble, x, y, device, batch: int = 1000, idx=None):
    """Per-run (loss, accuracy): on shared inputs x, y, or with ``idx`` (R, m) on run r's own rows x[idx[r]].
    Returns two (R,) float64 tensors."""
    R = ens.R
    loss = torch.zeros(R, dtype=torch.float64)
    hits = []
    m = len(y) if idx is None else idx.shape[1]
    for i in range(0, m, batch):
        if idx is None:
            xb, yb = x[i:i + batch].to(device).flatten(1), y[i:i + batch].to(device)
            yr = yb.expand(R, -1)
        else:
            ib = idx[:, i:i + batch].to(device)
            xb, yr = x[ib].flatten(2), y[ib]
        out = ens.forward(xb)  # (R, b, k)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), yr.reshape(-1), reduction="none")
        loss += ce.reshape(R, -1).sum(1).double().cpu()
        hits.append((out.argmax(-1) == yr).double().cpu())
    hits = torch.cat(hits, 1)  # (R, m)
    return loss / m, hits.mean(1), hits[:, 0::2].mean(1), hits[:, 1::2].mean(1)


def check_compatible(cfgs):
    base = cfgs[0]
    for c in cfgs[1:]:
        for k in SHARED:
            if getattr(c, k) != getattr(base, k):
                raise NeuralpathError(f"runs of one ensemble must share {k}: {getattr(base, k)!r} vs {getattr(c, k)!r}")
    if base.arch != "fc":
        raise NeuralpathError(f"the vectorised ensemble trains arch 'fc' only, not {base.arch!r}; train conv runs "
                              "one at a time (neuralpath.train.train)")


def train_ensemble(cfgs, outs, state_path, resume: bool = True, progress: bool | None = None, data=None,
                   log=print) -> list[dict]:
    """Train the runs ``cfgs`` (TrainConfig, fc) together, each into its folder ``outs[i]``; the ensemble's
    checkpoint is ``state_path``. Returns the result records in the order of ``cfgs``. Runs whose folder already
    holds result.json are not retrained (their record is returned)."""
    from tqdm import tqdm
    cfgs = [c.resolved() for c in cfgs]
    outs = [Path(o) for o in outs]
    if len(cfgs) != len(outs) or not cfgs:
        raise NeuralpathError("train_ensemble needs one output folder per config (and at least one run)")
    check_compatible(cfgs)
    results = {}
    todo = []
    for i, (c, o) in enumerate(zip(cfgs, outs)):
        if (o / "result.json").exists():
            results[i] = json.loads((o / "result.json").read_text())
        else:
            todo.append(i)
    if not todo:
        return [results[i] for i in range(len(cfgs))]
    todo.sort(key=lambda i: KIND_ORDER[cfgs[i].regime])
    tc = [cfgs[i] for i in todo]
    to = [outs[i] for i in todo]
    base = tc[0]
    device = resolve_device(base.device)
    x_full, y_full = data[0] if data is not None else load_train_full(base)
    xte, yte = data[1] if data is not None else load_test(base)
    split = [train_val_indices(c, y_full) for c in tc]
    tr_idx = [s[0] for s in split]
    if len({len(t) for t in tr_idx}) != 1:
        raise NeuralpathError("runs of one ensemble must have training sets of one size")
    tr_idx = torch.stack(tr_idx)  # (R, n): run r trains on x_full[tr_idx[r]]
    va_idx = torch.stack([s[1] for s in split]) if split[0][1] is not None else None
    xtr = x_full
    nets = []
    for c in tc:
        net, _ = build_regime(c.regime, c.arch, c.seed, load_relu_state(c), **net_kwargs(c, xtr.shape[1:], 10))
        nets.append(net)
    ens = FCEnsemble(nets, [c.regime for c in tc]).to(device)
    params = ens.parameters()
    opt = (torch.optim.Adam(params, lr=base.lr, eps=1e-7, fused=True) if base.optimizer == "adam"
           else torch.optim.SGD(params, lr=base.lr, momentum=0.0))
    R = ens.R
    fresh_best = {"best_test_acc": -1.0, "best_epoch": 0, "best_val_acc": -1.0, "best_val_epoch": 0,
                  "test_acc_at_best_val": None}
    best = [dict(fresh_best) for _ in range(R)]
    start = 1
    state_path = Path(state_path)
    cdicts = [dataclasses.asdict(c) for c in tc]
    ck = None
    if resume and state_path.exists():
        ck = checkpoints.load(state_path, require=("runs", "tensors", "optimizer"))
        if ck.get("runs") != [str(o) for o in to]:
            if not all((Path(r) / "result.json").exists() for r in ck.get("runs", [])):
                raise NeuralpathError(f"{state_path} belongs to another, unfinished set of runs; finish those runs "
                                      "or remove the file to start afresh")
            ck = None  # left by an ensemble whose runs all finished (e.g. seed 0 before --seeds 5): start afresh
    if ck is not None:
        with torch.no_grad():
            for t, s in zip(ens.tensors(), ck["tensors"]):
                t.copy_(s)
        opt.load_state_dict(ck["optimizer"])
        start, best = int(ck["epoch"]) + 1, [dict(b) for b in ck["best"]]
        for o in to:
            recs = [r for r in read_jsonl(o / "metrics.jsonl") if r["epoch"] < start]
            write_text(o / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    else:
        for o, cd in zip(to, cdicts):
            o.mkdir(parents=True, exist_ok=True)
            write_json(o / "config.json", dict(cd, ensemble=str(state_path)))
            write_text(o / "metrics.jsonl", "")
    n = tr_idx.shape[1]
    xtr_d, ytr_d = x_full.to(device).flatten(1), y_full.to(device)
    tr_idx = tr_idx.to(device)
    seeds = [c.seed for c in tc]
    bs = base.batch_size
    nt, nf = ens.nt, ens.nf
    gt_train = ens.frozen_gate_table(xtr_d) if nf else None  # (Rf, N_full, d-1, w)
    rows_f = torch.arange(nf, device=device)[:, None]
    bar = tqdm(range(start, base.epochs + 1), initial=start - 1, total=base.epochs,
               disable=None if progress is None else not progress, desc=f"ensemble of {R} runs", leave=False)
    test_acc = None
    for epoch in bar:
        t0 = time.time()
        order = torch.stack([epoch_order(n, s, epoch) for s in seeds]).to(device)  # (R, n)
        order = torch.gather(tr_idx, 1, order)  # positions in the full split
        tot_loss = torch.zeros(R, device=device)
        tot_correct = torch.zeros(R, device=device)
        for i in range(0, n, bs):
            idx = order[:, i:i + bs]
            flat = idx.reshape(-1)
            xb = xtr_d.index_select(0, flat).view(R, -1, xtr_d.shape[1])  # (R, b, D)
            yb = ytr_d.index_select(0, flat).view(R, -1)
            fg = gt_train[rows_f, idx[nt:nt + nf]] if nf else None
            out = ens.forward(xb, fg)
            b = idx.shape[1]
            ce = F.cross_entropy(out.reshape(R * b, -1), yb.reshape(-1), reduction="none").reshape(R, b)
            loss = ce.sum() / b
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += ce.detach().sum(1)
            tot_correct += (out.detach().argmax(-1) == yb).sum(1)
        train_loss = (tot_loss / n).tolist()
        train_acc = (tot_correct / n).tolist()
        bad = [tc[r].regime + f" seed {tc[r].seed}" for r in range(R) if not math.isfinite(train_loss[r])]
        if bad:
            raise NeuralpathError(f"training diverged in epoch {epoch} for {', '.join(bad)}; the last good ensemble "
                                  f"checkpoint is kept in {state_path} (try a smaller --lr)")
        te_loss, te_acc, te_even, te_odd = evaluate(ens, xte, yte, device)
        va = evaluate(ens, xtr_d, ytr_d, device, idx=va_idx) if va_idx is not None else None
        secs = (time.time() - t0) / R
        for r in range(R):
            rec = {"epoch": epoch, "train_loss": train_loss[r], "train_acc": train_acc[r],
                   "test_loss": float(te_loss[r]), "test_acc": float(te_acc[r]), "test_acc_even": float(te_even[r]),
                   "test_acc_odd": float(te_odd[r]), "seconds": secs}
            if float(te_acc[r]) > best[r]["best_test_acc"]:
                best[r].update(best_test_acc=float(te_acc[r]), best_epoch=epoch)
                checkpoints.save(to[r] / "best.pt", {"model": ens.state_dict_of(r), "config": cdicts[r], "epoch": epoch})
            if va is not None:
                rec["val_loss"], rec["val_acc"] = float(va[0][r]), float(va[1][r])
                if rec["val_acc"] > best[r]["best_val_acc"]:
                    best[r].update(best_val_acc=rec["val_acc"], best_val_epoch=epoch,
                                   test_acc_at_best_val=float(te_acc[r]))
            if tc[r].save_every and epoch % tc[r].save_every == 0:
                checkpoints.save(to[r] / f"epoch_{epoch}.pt", {"model": ens.state_dict_of(r), "config": cdicts[r],
                                                                "epoch": epoch})
            append_jsonl(to[r] / "metrics.jsonl", rec)
        checkpoints.save(state_path, {"runs": [str(o) for o in to], "epoch": epoch, "best": best,
                                      "tensors": [t.detach().cpu() for t in ens.tensors()],
                                      "optimizer": opt.state_dict()})
        test_acc = te_acc
        bar.set_postfix(test=f"{float(te_acc.mean()):.4f}")
    bar.close()
    for r in range(R):
        final = float(test_acc[r]) if test_acc is not None else read_jsonl(to[r] / "metrics.jsonl")[-1]["test_acc"]
        res = dict(best[r], clean_test_acc=clean_accuracy(read_jsonl(to[r] / "metrics.jsonl")), final_test_acc=final, epochs=base.epochs, config=cdicts[r], versions=versions(),
                   device=str(device), data=datasets.source_label(base.dataset, base.data_root), ensemble_of=R)
        write_json(to[r] / "result.json", res)
        results[todo[r]] = res
    return [results[i] for i in range(len(cfgs))]
