"""The neural path kernel in closed form (docs/THEORY.md §1), for fully connected and convolutional DGNs.

    H(x, x') = <phi_x, phi_x'> = <x, x'> * Lambda(x, x'),   Lambda = prod_{l=1}^{d-1} overlap_l(x, x'),
    overlap_l(x, x') = sum_i G_x(i, l) G_x'(i, l)

With biases (a bias is a weight from a constant-1 unit, so paths may start at any layer) the sum over paths
becomes the Horner-like recursion, b = 1 when the network has biases and 0 otherwise (not the soft gate's slope beta):

    H_0 = <x, x'>,   H_l = (H_{l-1} + b) * overlap_l,   H = H_{d-1} + b

Convolutions (3x3 'same', stride 1) never enumerate paths: the product of two inputs' signals is propagated
through the all-ones connectivity of the network. With t_l(h, w) the channel-summed signal at layer l,

    t_0(h, w) = sum_c x(c,h,w) x'(c,h,w)
    t_l(h, w) = (box_k(t_{l-1})(h, w) + b) * Omega_l(h, w),   Omega_l(h, w) = sum_c G_x(c,h,w,l) G_x'(c,h,w,l)

where box_k sums a k x k neighbourhood (zero padding). Flattening sums t over positions; global average pooling
does the same with weight 1/(HW)^2 (each path through the pool carries the fixed coefficient 1/(HW)); dense
layers then follow the FC recursion.

Scale: prod_l overlap_l overflows float32 for wide, deep nets (1e36 and beyond), so every overlap is divided by
its layer's width (channels), every aggregation by its fan (k^2 or HW), and the log of the removed scale is kept
exactly; ``npk`` multiplies it back at the end (and refuses with a clear error if that overflows the dtype), while
``normalize='trace'|'cosine'`` cancel it and never overflow.

Cost, n1 x n2 pairs: FC O(n1 n2 (d_in + sum_l w_l)) multiply-adds, all GEMMs; memory O((n1 + n2)(d_in + sum w_l))
for the features plus the tile. Conv: O(n1 n2 HW sum_l C_l) GEMM work plus O(n1 n2 HW k^2) for the box filters
per conv layer; tile memory O(b1 b2 HW).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, overload

import torch
import torch.nn.functional as F

from ..errors import NeuralpathError, check_choice
from ..nets.base import DGN
from ..nets.rules import rule, transition
from ..precision import kernel_dtype
from . import fused
from .gram import gram, tiling

if TYPE_CHECKING:
    from ..anynet.dgn import ModuleDGN
    from ..dlgn import DLGNVT

    Net = DGN | ModuleDGN | DLGNVT  # what the kernel accepts

NORMALIZE = (None, "trace", "cosine")


def _as_dtype(net: DGN, dtype):
    dtype = kernel_dtype(dtype)
    p = next(net.parameters())
    if dtype is None or dtype == p.dtype:
        return net
    return copy.deepcopy(net).to(dtype)


def _is_module_dgn(net) -> bool:
    from ..anynet import ModuleDGN

    return isinstance(net, ModuleDGN)


def _check_inputs(net, x1, x2):
    """Refuse what a kernel cannot be computed from; return the inputs detached (kernels are not differentiated:
    an input that requires grad is read as its values)."""
    if not isinstance(net, DGN) and not _is_module_dgn(net):
        raise TypeError(
            f"net must be an FCDGN, a ConvDGN or neuralpath.from_module(model, example), got " f"{type(net).__name__}"
        )
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise NeuralpathError(f"{name} of shape {tuple(x.shape)} is not a batch of inputs; pass (n, ...)")
        traced = tuple(getattr(net, "in_shape")) if _is_module_dgn(net) else None  # noqa: B009 (a Module attribute)
        if traced is not None and tuple(x.shape[1:]) != traced:
            raise NeuralpathError(
                f"{name} has per-example shape {tuple(x.shape[1:])} but from_module traced the model with "
                f"{traced}; the kernels follow the traced shapes: trace with an example of the inputs' "
                "shape"
            )
        if not bool(torch.isfinite(x).all()):
            raise NeuralpathError(f"{name} contains NaN or inf values")
    if x2 is not None and tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise NeuralpathError(
            f"x1 has per-example shape {tuple(x1.shape[1:])} but x2 has {tuple(x2.shape[1:])}; "
            "they must match the network's input"
        )
    return x1.detach(), None if x2 is None else x2.detach()


def _structure(net: DGN):
    """Per layer: (transition, kind 'conv'|'dense', aggregation window, b = 1.0 with a bias else 0.0), from the
    rule table (nets/rules.py)."""
    steps = []
    for l, layer in enumerate(net.value_layers):
        r = rule(layer)
        transition(net.transitions[l])  # an unknown transition raises here, naming it
        steps.append((net.transitions[l], r.kind, r.window(layer), 1.0 if layer.bias is not None else 0.0))
    return steps


@torch.no_grad()
def featurize(net: DGN, x, compact: bool = False):
    """(prepared input, list of gates, extras) for a block of inputs. Extras: the dense gates divided by their width
    (the FC tile loop folds the per-layer rescaling into the overlap GEMM) and, for conv nets, position-major copies
    (H*W, n, C) of the input and of each conv layer's gates.

    compact=True (hard gates only): the conv gates are kept bit-packed, position-major (H*W, n, ceil(C/8)) uint8,
    32x smaller than float32, and the NCHW gates are dropped; the tile loop unpacks a block's bits through a
    256-entry table when it needs them. This is what lets the features of 10,000 CIFAR-10 inputs stay in memory."""
    x = x.to(next(net.parameters()).device, next(net.parameters()).dtype)
    if x.dim() == 4:
        # channels-last convolutions: ~1.3x faster here, and their (n, H, W, C) outputs turn position-major with
        # contiguous runs of C values (4x faster than transposing NCHW). In float32 a pre-activation within rounding
        # of 0 may land on the other side than with NCHW (seen: 1 gate of 25 M; none in float64).
        x = x.contiguous(memory_format=torch.channels_last)
    gates = net.gates(x)
    z = net.value_in(net._prepare(x))
    extra: dict[str, Any] = {"scaled": [g / g.shape[1] if g.dim() == 2 else None for g in gates], "token": object()}
    if z.dim() == 2:  # FC nets (the only tile loop that reads them): bfloat16 copies of gates exact there
        # hard dense gates of a power-of-two width <= 256: g / width and the counts of an overlap are exact in
        # bfloat16, whose GEMMs are ~2x faster where the CPU has the units (kernels/fused.py): the same kernel
        extra["bf16"] = [
            (sc.bfloat16(), g.bfloat16()) if sc is not None and _exact_in_bf16(g) else None
            for sc, g in zip(extra["scaled"], gates)
        ]
    if z.dim() == 4:  # conv nets: position-major copies (positions, inputs, channels) for per-position GEMMs
        extra["x_pm"] = _pm(z)
        if compact:
            extra["g_bits"] = [_pack_pm(g) if g.dim() == 4 else None for g in gates]
            extra["chans"] = [g.shape[1] for g in gates]
            gates = [g if g.dim() == 2 else g.new_empty(0) for g in gates]  # the bits replace them
        else:
            extra["g_pm"] = [_pm(g) if g.dim() == 4 else None for g in gates]
    return z, gates, extra


def _exact_in_bf16(g) -> bool:
    """Whether dense gates g (n, width) take bfloat16 overlap GEMMs: 0/1 values (hard gates), a power-of-two width
    (1/width exact) of at most 256 (every count exact), on the CPU where those GEMMs are fast."""
    w = g.shape[1]
    if (
        g.device.type != "cpu"
        or w & (w - 1)
        or not fused.counts_in_bf16(w)
        or g.dtype not in (torch.float32, torch.float64)
    ):
        return False
    return bool(((g == 0) | (g == 1)).all())


def _pack_pm(g):
    """(n, C, H, W) hard gates -> (H*W, n, ceil(C/8)) uint8, bit j of byte i the gate of channel 8i + j (a channel
    count not a multiple of 8 is padded with closed gates, which add nothing to an overlap)."""
    from ..stacks import pack_bits

    n, c, h, w = g.shape
    return pack_bits(g.permute(2, 3, 0, 1).reshape(h * w * n, c) != 0).view(h * w, n, -1)


_BIT_TABLE = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8): bit j of byte v


def _unpack_pm(bits, dtype, out=None):
    """Inverse of :func:`_pack_pm` (channels padded to a multiple of 8): one table lookup per byte."""
    hw, n, nb = bits.shape
    if out is None:
        out = torch.empty((hw, n, 8 * nb), dtype=dtype, device=bits.device)
    torch.index_select(_BIT_TABLE.to(bits.device, dtype), 0, bits.reshape(-1).int(), out=out.view(-1, 8))
    return out


def _conv_gates_pm(e, l, bufs, side, dtype=None):
    """Layer l's position-major gates (H*W, n, C') of one side of a tile, C' = C or C padded to a multiple of 8:
    the float copy, or the bit-packed one unpacked (as ``dtype``, default the input's) into a buffer kept in
    ``bufs`` (side 1, the tile row, is unpacked once per row block)."""
    if "g_pm" in e:
        return e["g_pm"][l]
    bits = e["g_bits"][l]
    dtype = dtype or e["x_pm"].dtype
    key = (side, l)
    buf = bufs.get(key)
    if side == 1 and buf is not None and buf.dtype == dtype and bufs.get(("token", l)) is e["token"]:
        return buf
    shape = (bits.shape[0], bits.shape[1], 8 * bits.shape[2])
    if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
        buf = bufs[key] = torch.empty(shape, dtype=dtype, device=bits.device)
    if side == 1:
        bufs[("token", l)] = e["token"]
    return _unpack_pm(bits, buf.dtype, out=buf)


def _pm(t):
    """(n, C, H, W) -> (H*W, n, C) contiguous: batched GEMMs over positions then run at the BLAS rate (a permuted,
    non-contiguous operand made them 3-27x slower here). Cheapest from a channels-last tensor."""
    n, c, h, w = t.shape
    return t.permute(2, 3, 0, 1).reshape(h * w, n, c).contiguous()


def _overlap(g1, g2):
    """Per-layer overlap: (a, b) for dense gates, per position (a, b, H, W) for conv gates."""
    if g1.dim() == 2:
        return g1 @ g2.T
    a, c, h, w = g1.shape
    # (a, C, H, W), (b, C, H, W) -> (HW, a, C) @ (HW, C, b) -> (HW, a, b) -> (a, b, H, W)
    o = torch.bmm(g1.flatten(2).permute(2, 0, 1), g2.flatten(2).permute(2, 1, 0))
    return o.permute(1, 2, 0).reshape(a, g2.shape[0], h, w)


def _box(t, k):
    """Sum over a k x k neighbourhood with zero padding; t is (a, b, H, W)."""
    a, b, h, w = t.shape
    ones = torch.ones((1, 1, k, k), dtype=t.dtype, device=t.device)
    return F.conv2d(t.reshape(a * b, 1, h, w), ones, padding=k // 2).reshape(a, b, h, w)


def _overlap_diag(g1, g2):
    """Row-wise overlap of paired inputs: (a, 1) for dense, (a, 1, H, W) per position for conv."""
    return (g1 * g2).sum(1, keepdim=True)


def npk_pair(net: DGN, f1, f2, per_layer: bool = False, diag: bool = False, bufs=None) -> tuple:
    """Scaled NPK block: returns (H_tilde (a, b), log_scale) with H = H_tilde * exp(log_scale).

    With per_layer=True also returns the list of total per-layer overlaps (a, b). With diag=True, f1 and f2
    hold paired inputs and the result is the (a, 1) column H(x1_i, x2_i). ``bufs``: a dict the conv tile loop
    keeps its pair-sized work buffers in between calls (one per Gram computation).
    """
    (x1, g1, e1), (x2, g2, e2) = f1, f2
    steps = _structure(net)
    if not diag and not per_layer:
        if all(k == "dense" and tr == "none" for tr, k, _, _ in steps):
            return _pair_fc(x1, e1["scaled"], x2, g2, steps, e1.get("bf16"), e2.get("bf16"))
        if "x_pm" in e1:
            return _pair_conv(x1.shape[-2:], e1, e2, steps, bufs)
    ov = _overlap_diag if diag else _overlap
    t = ov(x1, x2)  # <x, x'> (a, b) for dense input; sum_c x x' per position (a, b, H, W) for images
    log_s = 0.0
    overlaps = []
    d = len(steps)
    for l, (trans, kind, k, b) in enumerate(steps):
        # aggregate the incoming signal over each unit's fan-in (all-ones connectivity)
        if trans in ("flatten", "gap"):
            hw = t.shape[-1] * t.shape[-2]
            t = t.sum(dim=(-2, -1)) / hw  # flatten: sum over positions (normalised by HW)
            log_s += math.log(hw)
            if trans == "gap":  # each path through the pool carries 1/(HW): 1/(HW)^2 per pair
                t = t / hw**2
        if kind == "conv":
            t = _box(t, k) / (k * k)
            log_s += math.log(k * k)
        bias = b * math.exp(-log_s) if b else 0.0
        if l == d - 1:
            t = t + bias
            break
        om = ov(g1[l], g2[l])
        if per_layer:
            overlaps.append(om if om.dim() == 2 else om.sum(dim=(-2, -1)))
        width = g1[l].shape[1]
        t = (t + bias) * (om / width)
        log_s += math.log(width)
    return (t, log_s, overlaps) if per_layer else (t, log_s)


def _box_pm_inplace(t, spare, h, w, k, bias=0.0):
    """t <- (k x k window sums of t, zero padding) + bias, t position-major (H*W, a, b): separable shifted adds
    through one spare buffer of t's size (no new pair-sized tensor: fresh ones cost page faults)."""
    r = k // 2
    u, v = t.view(h, w, -1), spare.view(h, w, -1)
    v.copy_(u)
    for d in range(1, r + 1):
        v[d:] += u[:-d]
        v[:-d] += u[d:]
    if bias:
        torch.add(v, bias, out=u)
    else:
        u.copy_(v)
    for d in range(1, r + 1):
        u[:, d:] += v[:, :-d]
        u[:, :-d] += v[:, d:]


def _pair_conv(hw, e1, e2, steps, bufs=None):
    """The conv tile loop: the compiled one (:func:`_pair_conv_fused`) for large tiles on the CPU where it compiles,
    else :func:`_pair_conv_ops`."""
    x1, x2 = e1["x_pm"], e2["x_pm"]
    fused.bf16_mode()  # a bad NEURALPATH_BF16 is an error whichever loop runs
    convs = [k for _, kind, k, _ in steps if kind == "conv"]
    first_flat = next((i for i, s in enumerate(steps) if s[0] in ("flatten", "gap")), len(steps))
    fusable = (
        x1.device.type == "cpu"
        and all(kind == "conv" for _, kind, _, _ in steps[:first_flat])
        and first_flat < len(steps)
        and fused.wanted(hw[0] * hw[1] * x1.shape[1] * x2.shape[1])
    )
    if fusable:
        pad = max(k // 2 for k in convs)
        # hard gates (bit-packed): the overlaps are channel counts, exact as bfloat16 GEMMs where those are fast
        counts = "g_bits" in e1 and "g_bits" in e2 and fused.counts_in_bf16(max(e1["chans"][: len(convs)]))
        ops = {k: fused.window_ops(hw[0], hw[1], k, pad, x1.dtype, counts) for k in set(convs)}
        if all(o is not None for o in ops.values()):
            return _pair_conv_fused(hw, pad, ops, e1, e2, steps, {} if bufs is None else bufs, counts)
    return _pair_conv_ops(hw, e1, e2, steps, bufs)


def _pair_conv_fused(hw, pad, ops, e1, e2, steps, bufs, counts=False):
    """The conv tile loop with one compiled pass per conv layer (kernels/fused.py): the tile T lives in a
    zero-bordered buffer (H + 2 pad, W + 2 pad, a, b); per layer the overlap GEMMs write the interior of the other
    buffer (one batched GEMM per row of positions), then (window sum of T + bias) * overlap is written over it and the
    two buffers swap. Same arithmetic as :func:`_pair_conv_ops` (the same 1/k^2 and 1/C folding). With ``counts``
    the GEMMs take the 0/1 gates as bfloat16 and write the exact counts to a bfloat16 buffer, which the pass scales
    (count x scale rounded once; BLAS applies ``alpha`` in its own order, so float32 kernels differ at rounding)."""
    h, w = hw
    x1, x2 = e1["x_pm"], e2["x_pm"]
    a, b_ = x1.shape[1], x2.shape[1]
    shape = (h + 2 * pad, w + 2 * pad, a, b_)
    if "tp" not in bufs or tuple(bufs["tp"].shape) != shape or bufs["tp"].dtype != x1.dtype:
        # edge tiles change the shape: views of two flat buffers sized for the largest tile (a fresh pair-sized
        # tensor costs page faults worth several passes), zeroed once per change of shape (the borders stay zero)
        size = math.prod(shape)
        flat = bufs.get("flat")
        if flat is None or flat[0].numel() < size or flat[0].dtype != x1.dtype:
            flat = bufs["flat"] = (x1.new_empty(size), x1.new_empty(size))
        bufs["tp"], bufs["op"] = (f[:size].view(shape).zero_() for f in flat)
    tp, op = bufs["tp"], bufs["op"]
    inner = tp[pad : pad + h, pad : pad + w]
    xa, xb = x1.view(h, w, a, -1), x2.view(h, w, b_, -1)
    if x1.shape[2] <= 4:  # sum_c x x' per position; a GEMM with K = 3 runs far below the BLAS rate here
        torch.mul(xa[:, :, :, None, 0], xb[:, :, None, :, 0], out=inner)
        for c in range(1, x1.shape[2]):
            inner.addcmul_(xa[:, :, :, None, c], xb[:, :, None, :, c])
    else:
        for i in range(h):
            torch.bmm(xa[i], xb[i].transpose(1, 2), out=inner[i])
    log_s, t = 0.0, None
    for l, (trans, kind, k, b) in enumerate(steps):
        if trans in ("flatten", "gap"):  # the borders are zero: the sum over the buffer is the sum over positions
            n_pos = h * w
            t = tp.sum((0, 1)).div_(n_pos)
            log_s += math.log(n_pos)
            if trans == "gap":
                t.div_(n_pos**2)
        if kind == "conv":  # never the last layer (checked by the caller)
            log_s += math.log(k * k)
            bias = b * math.exp(-log_s) * k * k if b else 0.0
            width = e1["chans"][l] if "chans" in e1 else e1["g_pm"][l].shape[2]
            lowp = torch.bfloat16 if counts else None
            g1, g2 = _conv_gates_pm(e1, l, bufs, 1, lowp), _conv_gates_pm(e2, l, bufs, 2, lowp)
            g1, g2 = g1.view(h, w, a, -1), g2.view(h, w, b_, -1)
            if counts:
                size = h * w * a * b_
                if "counts" not in bufs or bufs["counts"].numel() < size:
                    bufs["counts"] = torch.empty(size, dtype=torch.bfloat16, device=tp.device)
                c = bufs["counts"][:size].view(h, w, a, b_)
                for i in range(h):
                    torch.bmm(g1[i], g2[i].transpose(1, 2), out=c[i])
                ops[k](
                    tp, op, c, torch.tensor(bias, dtype=tp.dtype), torch.tensor(1.0 / (k * k * width), dtype=tp.dtype)
                )
            else:
                for i in range(h):
                    row = op[pad + i, pad : pad + w]
                    torch.baddbmm(row, g1[i], g2[i].transpose(1, 2), beta=0.0, alpha=1.0 / (k * k * width), out=row)
                ops[k](tp, op, torch.tensor(bias, dtype=tp.dtype))
            tp, op = op, tp
            log_s += math.log(width)
            continue
        assert t is not None
        if b:
            t.add_(b * math.exp(-log_s))
        if l == len(steps) - 1:
            break
        g2 = e2["scaled"][l] * e2["scaled"][l].shape[1]  # the unscaled gates
        t.mul_(e1["scaled"][l] @ g2.T)
        log_s += math.log(g2.shape[1])
    bufs["tp"], bufs["op"] = tp, op
    return t, log_s


def _pair_conv_ops(hw, e1, e2, steps, bufs=None):
    """The conv tile loop, position-major: T (H*W, a, b) and one spare buffer of its size, both kept in ``bufs``
    from tile to tile (a fresh 256 MB tensor costs page faults worth several passes over it); per conv layer a
    separable box sum (the bias fused into its middle copy), one batched GEMM over positions for the channel-summed
    gate overlap (1/C folded into one operand, 1/k^2 into the GEMM's alpha), one in-place product."""
    h, w = hw
    x1, x2 = e1["x_pm"], e2["x_pm"]
    shape = (x1.shape[0], x1.shape[1], x2.shape[1])
    bufs = {} if bufs is None else bufs
    if "t" not in bufs or tuple(bufs["t"].shape) != shape:
        bufs["t"], bufs["spare"] = x1.new_empty(shape), x1.new_empty(shape)
    t, spare = bufs["t"], bufs["spare"]
    if x1.shape[2] <= 4:  # sum_c x x' per position; a GEMM with K = 3 runs far below the BLAS rate here
        torch.mul(x1[:, :, None, 0], x2[:, None, :, 0], out=t)
        for c in range(1, x1.shape[2]):
            t.addcmul_(x1[:, :, None, c], x2[:, None, :, c])
    else:
        torch.bmm(x1, x2.transpose(1, 2), out=t)
    log_s = 0.0
    d = len(steps)
    unscaled = 1.0  # t holds T * unscaled (the last box sum's k^2, not yet divided out)
    for l, (trans, kind, k, b) in enumerate(steps):
        if trans in ("flatten", "gap"):
            n_pos = t.shape[0]
            t = t.sum(0).div_(n_pos * unscaled)
            unscaled = 1.0
            log_s += math.log(n_pos)
            if trans == "gap":  # each path through the pool carries 1/(HW): 1/(HW)^2 per pair
                t.div_(n_pos**2)
        if kind == "conv":
            log_s += math.log(k * k)
            unscaled = float(k * k)
            bias = b * math.exp(-log_s) * unscaled if b else 0.0
            _box_pm_inplace(t, spare, h, w, k, bias)
        elif b:
            t.add_(b * math.exp(-log_s))
        if l == d - 1:
            if unscaled != 1.0:
                t.div_(unscaled)
            break
        if kind == "conv":
            width = e1["chans"][l] if "chans" in e1 else e1["g_pm"][l].shape[2]
            g1, g2 = _conv_gates_pm(e1, l, bufs, 1), _conv_gates_pm(e2, l, bufs, 2)
            ov = torch.baddbmm(spare, g1, g2.transpose(1, 2), beta=0.0, alpha=1.0 / (unscaled * width), out=spare)
            unscaled = 1.0
            t.mul_(ov)
            log_s += math.log(width)
        else:
            g2 = e2["scaled"][l] * e2["scaled"][l].shape[1]  # the unscaled gates
            t.mul_(e1["scaled"][l] @ g2.T)
            log_s += math.log(g2.shape[1])
    if t is bufs.get("t"):  # the tile buffers never leave the loop
        t = t.clone()
    return t, log_s


def _pair_fc(x1, s1, x2, g2, steps, b1=None, b2=None):
    """The FC tile loop with every elementwise pass in place: H_l = (H_{l-1} + b) * overlap_l / width_l, the
    1/width folded into the GEMM through the pre-scaled gates (one pass over the tile per layer, two with biases).
    ``b1``/``b2``: per layer, bfloat16 copies (scaled, unscaled) of both sides' gates where they are exact
    (:func:`_exact_in_bf16`); that layer's overlap GEMM then runs in bfloat16 and gives the same values."""
    t = x1 @ x2.T
    log_s = 0.0
    d = len(steps)
    for l, (_, _, _, b) in enumerate(steps):
        if b:
            t.add_(b * math.exp(-log_s))
        if l == d - 1:
            break
        if b1 is not None and b2 is not None and b1[l] is not None and b2[l] is not None:
            t.mul_(b1[l][0] @ b2[l][1].T)
        else:
            t.mul_(s1[l] @ g2[l].T)
        log_s += math.log(g2[l].shape[1])
    return t, log_s


def _finish(t, log_s, dtype):
    h = t.mul_(math.exp(log_s)) if log_s < 700 else t * float("inf")
    lo, hi = torch.aminmax(h)  # one reduction pass instead of isfinite + all
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise NeuralpathError(
            f"the NPK overflows {dtype} (scale e^{log_s:.1f}); use normalize='trace' or 'cosine', "
            "or dtype=torch.float64"
        )
    return h


METHODS = ("closed_form", "paths")


class KernelOptions(TypedDict, total=False):
    """The keyword options every kernel takes besides ``out`` (the kernel contract, for the typed overloads)."""

    diag: bool
    method: str
    dtype: torch.dtype | str | None  # None: the network's own; "float32" / "float64" accepted
    block: int
    progress: bool | str  # True: a bar; "log": a line every ten minutes (kernels/gram.py)


class NpkOptions(KernelOptions, total=False):
    """:func:`npk`'s options: the contract's and ``normalize``."""

    normalize: str | None


@overload
def npk(net: Net, x1, x2=None, *, out: None = None, **options: Unpack[NpkOptions]) -> torch.Tensor: ...


@overload
def npk(net: Net, x1, x2=None, *, out: str | Path, **options: Unpack[NpkOptions]) -> Path: ...


def npk(
    net: Any,
    x1,
    x2=None,
    *,
    diag: bool = False,
    method: str = "closed_form",
    normalize=None,
    dtype=None,
    block: int = 1024,
    out=None,
    progress: bool | str = False,
) -> Any:
    """Neural path kernel H(x1, x2) = <phi_x1, phi_x2>.

    method 'closed_form' (default): never enumerates paths; cost the overlap GEMMs (docs/THEORY.md §2, §7).
    method 'paths': the explicit NPF Gram matrix npf(x1) npf(x2)^T, the reference for small networks (refuses,
    with the path count, when the paths are too many). diag=True: the (n1,) vector H(x_i, x_i), linear in n1.
    normalize: None (the kernel itself), 'trace' (H / trace H, symmetric case only) or 'cosine'
    (H(x,x') / sqrt(H(x,x) H(x',x'))). dtype: compute and return in this dtype (e.g. torch.float64).
    block/out/progress: see :func:`neuralpath.kernels.gram.gram` (out streams into a .npy memmap).
    dtype None computes in the network's own dtype (inputs are cast to it): a float32 network gives a float32 kernel
    even for float64 inputs.
    """
    dtype = kernel_dtype(dtype)
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("method", method, METHODS)
    from ..dlgn import DLGNVT

    if isinstance(net, DLGNVT):
        return _npk_dlgnvt(net, x1, x2, diag, method, normalize, dtype, block, out, progress)
    if method == "paths" or diag:
        if normalize is not None or out is not None:
            raise NeuralpathError("diag=True and method='paths' return the kernel in memory, unnormalised")
        x1, x2 = _check_inputs(net, x1, x2)
        if diag and x2 is not None:
            raise NeuralpathError("diag=True takes x1 only: the diagonal H(x_i, x_i)")
        if method == "paths":
            from ..paths import npf

            p1 = npf(net, x1, dtype=dtype)
            return (p1 * p1).sum(1) if diag else p1 @ (p1 if x2 is None else npf(net, x2, dtype=dtype)).T
        if _is_module_dgn(net):
            from ..anynet import npk_module

            return npk_module(net, x1, diag=True, dtype=dtype)
        return npk_diag(_as_dtype(net, dtype), x1)
    x1, x2 = _check_inputs(net, x1, x2)
    if _is_module_dgn(net):
        from ..anynet import npk_module

        if normalize == "trace" and x2 is not None:
            raise NeuralpathError("normalize='trace' needs the symmetric kernel (x2=None)")
        if normalize is not None and out is not None:
            raise NeuralpathError("normalize= is not supported together with out=; normalise the memmap afterwards")
        K = npk_module(
            net, x1, x2, dtype=dtype, block=min(block, 256), out=out, progress=progress, scaled=normalize is not None
        )  # normalised kernels are ratios: computed from the scaled kernel, they never overflow
        if normalize is None:
            return K

        def diagonal(x):  # the symmetric kernel holds its own diagonal: no second pass through the model
            return K.diagonal().clone() if x2 is None else npk_module(net, x, diag=True, dtype=dtype, scaled=True)

        return _normalised(K, normalize, x1, x2, diagonal)
    if normalize == "trace" and x2 is not None:
        raise NeuralpathError("normalize='trace' needs the symmetric kernel (x2=None)")
    net = _as_dtype(net, dtype)
    dt = next(net.parameters()).dtype
    scale = {}
    bufs: dict = {}

    def pair(a, b):
        t, ls = npk_pair(net, a, b, bufs=bufs)
        scale["log"] = ls
        if normalize is None:
            return _finish(t, ls, dt)
        return t

    f0 = featurize(net, x1[:1])
    item = torch.empty((), dtype=dt).element_size()
    n_units = sum(g.numel() for g in f0[1]) + x1[:1].numel()
    per_input = n_units * item + sum(4 * c[1].numel() for c in f0[2].get("bf16", ()) if c is not None)  # + bf16
    compact = False
    if "x_pm" in f0[2]:  # conv: a tile holds H*W values per pair; keep it near 256 MB
        per_pair = f0[2]["x_pm"].shape[0] * item
        block = max(16, min(block, int((256 * 2**20 / per_pair) ** 0.5)))
        compact = net.tied or net.gate_kind == "hard"  # 0/1 gates: keep them as bits
        gate_units = n_units - x1[:1].numel()
        per_input = 2 * x1[:1].numel() * item + (gate_units // 8 + 1 if compact else 2 * gate_units * item)
    tiles = tiling(net, block=block, out=out, dtype=dt, progress=progress, kernel="npk")
    K = gram(
        lambda x: featurize(net, x, compact=compact),
        pair,
        x1,
        x2,
        desc="NPK",
        feature_bytes_per_input=per_input,
        **tiles,
    )
    if normalize is None:
        return K
    if out is not None:
        raise NeuralpathError("normalize= is not supported together with out=; normalise the memmap afterwards")
    return _normalised(K, normalize, x1, x2, lambda x: npk_diag(net, x, scaled=True))


def _normalised(K, normalize, x1, x2, diag):
    """K / trace K, or K(x, x') / sqrt(K(x, x) K(x', x')) with ``diag(x)`` the (scaled) diagonal; an input with
    H(x, x) = 0 (no open path: an all-zero input of a bias-free network, or every gate of a layer closed) has no
    cosine, and a zero trace no normalisation: both refused rather than returned as NaN."""
    if normalize == "trace":
        tr = K.diagonal().sum()
        if not bool(tr > 0):
            raise NeuralpathError("normalize='trace': the kernel's trace is 0 (no input has an open path); use None")
        return K / tr
    d1 = diag(x1)
    d2 = d1 if x2 is None else diag(x2)
    for name, d in (("x1", d1), ("x2", d2)):
        zero = (d <= 0).nonzero()
        if len(zero):
            raise NeuralpathError(
                f"normalize='cosine': H(x, x) = 0 for {name}[{int(zero[0, 0])}] (no open path: an all-zero input of a "
                "bias-free network, or all gates of a layer closed), so its cosine is undefined; drop it or use None"
            )
    return K / torch.sqrt(d1[:, None] * d2[None, :])


def _npk_dlgnvt(net, x1, x2, diag, method, normalize, dtype, block, out, progress):
    """The DLGN-VT kernel (one path per choice of a unit in each gated layer, value input all ones):
    H(x, x') = prod_l <g_l(x), g_l(x')>, through the Gram engine; method 'paths' is the Gram matrix of its explicit
    NPF (the outer product of the layers' gates)."""
    if normalize is not None:
        raise NeuralpathError("the DLGN-VT kernel is unnormalised; normalise the result (H / sqrt(diag diag^T))")
    if diag and x2 is not None:
        raise NeuralpathError("diag=True takes x1 only: the diagonal H(x_i, x_i)")
    vt: Any = _as_dtype(net, dtype)  # a DLGNVT (not a DGN)
    dt = next(vt.parameters()).dtype

    def gates(x):
        with torch.no_grad():
            return vt.gates(x.to(dt))

    if method == "paths" or diag:
        if out is not None:
            raise NeuralpathError("diag=True and method='paths' return the kernel in memory")
        if method == "paths":
            with torch.no_grad():
                p1 = vt.npf(x1.to(dt))
                return (p1 * p1).sum(1) if diag else p1 @ (p1 if x2 is None else vt.npf(x2.to(dt))).T
        return math.prod([(g * g).sum(1) for g in gates(x1)])

    def pair(a, b):
        return math.prod([ga @ gb.T for ga, gb in zip(a, b)])

    return gram(gates, pair, x1, x2, block=block, out=out, dtype=dt, progress=progress, desc="NPK")


def npk_diag(net: DGN, x, scaled: bool = False, block: int = 4096):
    """H(x_i, x_i) for every row, without the off-diagonal work (cost linear in n)."""
    out = []
    for i in range(0, len(x), block):
        f = featurize(net, x[i : i + block])
        t, ls = npk_pair(net, f, f, diag=True)
        out.append((t if scaled else _finish(t, ls, t.dtype)).reshape(-1))
    return torch.cat(out)


def overlaps(net, x1, x2=None, dtype=None):
    """Per-hidden-layer overlap matrices overlap_l(x1, x2) = sum_i G_x1(i,l) G_x2(i,l), each (n1, n2)."""
    x1, x2 = _check_inputs(net, x1, x2)
    net = _as_dtype(net, dtype)
    if _is_module_dgn(net):
        from ..anynet import overlaps_module

        return overlaps_module(net, x1, x2)
    f1 = featurize(net, x1)
    f2 = f1 if x2 is None else featurize(net, x2)
    return [_overlap(a, b) if a.dim() == 2 else _overlap(a, b).sum(dim=(-2, -1)) for a, b in zip(f1[1], f2[1])]
