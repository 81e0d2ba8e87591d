"""A user's ReLU network as a list of path-algebra operations (docs/THEORY.md §7), traced with torch.fx.

Every node of the traced graph becomes one :class:`Op` of a small set whose path algebra is known exactly:

| op | from | units and edges |
|---|---|---|
| linear | nn.Linear (on the last axis, at every leading position) | weight edges in -> out; a bias unit |
| conv | nn.Conv2d (any stride, padding, dilation, groups; zeros) | weight edges in the window and group; a bias |
| gate | nn.ReLU, F.relu, .relu(), nn.LeakyReLU, F.leaky_relu | gated by G_x in {0, 1} (leaky: {alpha, 1}) |
| maxpool | nn.MaxPool2d, F.max_pool2d | the edge PyTorch's backward routes through (first on ties) is open |
| avgpool | nn.AvgPool2d, F.avg_pool2d, nn.AdaptiveAvgPool2d, ... | fixed edges 1/divisor, as PyTorch divides |
| bn | nn.BatchNorm1d/2d in eval mode | weight edge a_c = gamma_c / sqrt(var_c + eps); bias b_c = beta_c - a_c mean_c |
| flatten | nn.Flatten, torch.flatten, .flatten(1), .view(n, -1) / .reshape(n, -1) | identity |
| identity | nn.Dropout (eval), nn.Identity | identity |
| add | operator.add, torch.add, .add (residual sums) | two identity edges per unit |
| cat | torch.cat along channels | units keep their edges |

Anything else is refused before any work, naming the node and what is supported.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import NeuralpathError

SUPPORTED = (
    "Linear, Conv2d (any stride/padding/dilation/groups, zero padding), ReLU, LeakyReLU, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, x.mean((2, 3)), BatchNorm1d/2d (eval mode), Flatten and view/reshape to "
    "(n, -1), Dropout (eval), Identity, residual addition, concatenation along channels"
)


@dataclass
class Op:
    kind: str  # input | linear | conv | gate | maxpool | avgpool | bn | flatten | identity | add | cat
    name: str  # the fx node's name
    args: list  # indices of the ops this one reads
    module: str | None = None  # qualified name of the module holding the parameters (linear, conv, bn)
    opts: dict = field(default_factory=dict)
    shape: tuple = ()  # per-example output shape


def conv_padding(m: nn.Conv2d, name="conv"):
    """Numeric (top/bottom, left/right) zero padding of a Conv2d, also for padding='valid' and 'same'."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        eff = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
        if any(e % 2 for e in eff):
            raise NeuralpathError(
                f"node {name!r}: padding='same' with an even effective kernel pads unevenly; "
                "give the padding as numbers"
            )
        return tuple(e // 2 for e in eff)
    return tuple(m.padding)


def _is_shape_query(node) -> bool:
    """``x.shape[i]`` / ``x.size()[i]``: an index into a shape, which only a view/reshape may use."""
    src = node.args[0]
    return isinstance(src, fx.Node) and (
        (src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",))
        or (src.op == "call_method" and src.target == "size")
    )


def _const(v, what, node):
    if isinstance(v, fx.Node):
        raise NeuralpathError(f"node {node.name!r}: {what} must be a constant, not computed from the data")
    return v


_POOL_FIELDS = {
    "maxpool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avgpool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}


def _pool_opts(kind, **kw):
    """A pooling node's options, normalised (pairs, stride defaulting to the kernel size) from nn.MaxPool2d /
    nn.AvgPool2d attributes or F.max_pool2d / F.avg_pool2d keywords."""

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    k = pair(kw["kernel_size"])
    opts = dict(
        kernel_size=k,
        stride=pair(kw.get("stride") or k),
        padding=pair(kw.get("padding", 0)),
        dilation=pair(kw.get("dilation", 1)),
        ceil_mode=bool(kw.get("ceil_mode", False)),
        count_include_pad=bool(kw.get("count_include_pad", True)),
        divisor_override=kw.get("divisor_override"),
    )
    return {f: opts[f] for f in _POOL_FIELDS[kind]}


def _module_pool_opts(kind, m):
    return _pool_opts(kind, **{f: getattr(m, f) for f in _POOL_FIELDS[kind]})


def trace(model: nn.Module, example: torch.Tensor) -> list[Op]:
    """The operations of ``model`` in topological order (op 0 is the input, the last op is the output)."""
    if not isinstance(model, nn.Module):
        raise NeuralpathError(f"from_module needs a torch.nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(example) or example.dim() < 2:
        raise NeuralpathError("example must be a batch of inputs (n, ...) with n >= 1, e.g. x[:2]")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeuralpathError(
            f"cannot trace {type(model).__name__} with torch.fx ({first[:160]}); the model's "
            "forward must not branch on the data"
        ) from None
    mods = dict(gm.named_modules())
    ops: list[Op] = []
    index: dict[str, int] = {}

    def arg(n, node):
        if not isinstance(n, fx.Node) or n.name not in index:
            raise NeuralpathError(f"node {node.name!r}: an argument is not a tensor computed from the input")
        return index[n.name]

    def add(kind, node, args, **kw):
        index[node.name] = len(ops)
        ops.append(Op(kind=kind, name=node.name, args=args, **kw))

    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if ops:
                raise NeuralpathError(f"node {node.name!r}: the model takes more than one input; one is supported")
            add("input", node, [])
        elif node.op == "output":
            output = node.args[0]
            if not isinstance(output, fx.Node):
                raise NeuralpathError("the model must return one tensor (the logits)")
        elif node.op == "call_module":
            m = mods[node.target]
            a = [arg(node.args[0], node)]
            if isinstance(m, nn.Linear):
                add("linear", node, a, module=node.target)
            elif isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros":
                    raise NeuralpathError(
                        f"node {node.name!r}: Conv2d with padding_mode={m.padding_mode!r}; only zero "
                        "padding is supported"
                    )
                add("conv", node, a, module=node.target, opts=dict(padding=conv_padding(m, node.name)))
            elif isinstance(m, nn.ReLU):
                add("gate", node, a, opts=dict(alpha=0.0))
            elif isinstance(m, nn.LeakyReLU):
                add("gate", node, a, opts=dict(alpha=float(m.negative_slope)))
            elif isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    raise NeuralpathError(f"node {node.name!r}: MaxPool2d(return_indices=True) is not supported")
                add("maxpool", node, a, opts=_module_pool_opts("maxpool", m))
            elif isinstance(m, nn.AvgPool2d):
                add("avgpool", node, a, opts=_module_pool_opts("avgpool", m))
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                add("avgpool", node, a, opts=dict(adaptive=m.output_size))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.training:
                    raise NeuralpathError(
                        f"node {node.name!r}: BatchNorm in training mode (its output depends on the "
                        "batch); call model.eval() first"
                    )
                if not m.track_running_stats:
                    raise NeuralpathError(f"node {node.name!r}: BatchNorm without running statistics is not supported")
                add("bn", node, a, module=node.target)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise NeuralpathError(f"node {node.name!r}: Flatten must flatten dims 1..-1")
                add("flatten", node, a)
            elif isinstance(m, (nn.Dropout, nn.Identity)):
                if isinstance(m, nn.Dropout) and m.training and m.p > 0:
                    raise NeuralpathError(f"node {node.name!r}: Dropout in training mode; call model.eval() first")
                add("identity", node, a)
            else:
                raise NeuralpathError(
                    f"node {node.name!r} is a {type(m).__name__}, which the path view does not "
                    f"support (supported: {SUPPORTED})"
                )
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in (F.relu, torch.relu, "relu", torch.relu_, "relu_"):
                add("gate", node, [arg(node.args[0], node)], opts=dict(alpha=0.0))
            elif t in (F.leaky_relu, "leaky_relu"):
                slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
                add(
                    "gate",
                    node,
                    [arg(node.args[0], node)],
                    opts=dict(alpha=float(_const(slope, "negative_slope", node))),
                )
            elif t in (operator.add, torch.add, "add", operator.iadd):
                if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
                    raise NeuralpathError(f"node {node.name!r}: only the sum of two tensors is supported")
                add("add", node, [arg(node.args[0], node), arg(node.args[1], node)])
            elif t is torch.cat:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if _const(dim, "dim", node) != 1:
                    raise NeuralpathError(f"node {node.name!r}: concatenation along dim {dim}; only channels (dim=1)")
                add("cat", node, [arg(a, node) for a in node.args[0]])
            elif t in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                if (start, end) != (1, -1):
                    raise NeuralpathError(f"node {node.name!r}: flatten must flatten dims 1..-1")
                add("flatten", node, [arg(node.args[0], node)])
            elif t in ("view", "reshape"):
                add("flatten", node, [arg(node.args[0], node)], opts=dict(check_flat=True))
            elif t in ("size", getattr) or t is getattr or (t is operator.getitem and _is_shape_query(node)):
                continue  # shape queries (x.size(0), x.shape[0]) feed view(); checked by the view's result
            elif t in (F.max_pool2d,):
                kw: dict[str, Any] = dict(
                    zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:])
                )
                kw.update(node.kwargs)
                if kw.pop("return_indices", False):
                    raise NeuralpathError(f"node {node.name!r}: max_pool2d(return_indices=True) is not supported")
                add("maxpool", node, [arg(node.args[0], node)], opts=_pool_opts("maxpool", **kw))
            elif t in (F.avg_pool2d,):
                kw = dict(
                    zip(
                        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                        node.args[1:],
                    )
                )
                kw.update(node.kwargs)
                add("avgpool", node, [arg(node.args[0], node)], opts=_pool_opts("avgpool", **kw))
            elif t in (F.adaptive_avg_pool2d,):
                size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
                add("avgpool", node, [arg(node.args[0], node)], opts=dict(adaptive=_const(size, "output_size", node)))
            elif t in (torch.mean, "mean"):  # x.mean((2, 3)): global average pooling written as a mean
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                dims = _const(dims, "dim", node)
                dl = list(dims) if isinstance(dims, tuple | list) else [dims]
                if (
                    not all(isinstance(d, int) for d in dl)
                    or sorted(d % 4 for d in dl) != [2, 3]
                    or "dtype" in node.kwargs
                ):
                    raise NeuralpathError(
                        f"node {node.name!r}: mean over dim={dims!r}; only the spatial mean of an image "
                        "(dim=(2, 3) or (-2, -1): global average pooling) is supported"
                    )
                ops.append(Op(kind="avgpool", name=node.name, args=[arg(node.args[0], node)], opts=dict(adaptive=1)))
                index[node.name] = len(ops) - 1
                if not _const(keep, "keepdim", node):
                    add("flatten", node, [len(ops) - 1])
            elif t in (F.dropout, "contiguous"):
                add("identity", node, [arg(node.args[0], node)])
            else:
                what = getattr(t, "__name__", str(t))
                nl = (
                    " (a nonlinearity other than ReLU/LeakyReLU)"
                    if what in ("gelu", "tanh", "sigmoid", "silu", "elu", "softmax", "softplus", "hardtanh")
                    else ""
                )
                raise NeuralpathError(
                    f"node {node.name!r} calls {what}{nl}, which the path view does not support "
                    f"(supported: {SUPPORTED})"
                )
        else:
            raise NeuralpathError(
                f"node {node.name!r} ({node.op} {node.target}) is not supported " f"(supported: {SUPPORTED})"
            )
    if output is None or output.name not in index:
        raise NeuralpathError("the model's output is not computed from its input by supported operations")
    if index[output.name] != len(ops) - 1:
        # drop dead branches: keep the ops the output depends on
        raise NeuralpathError("the model computes values it does not return; remove them before from_module")
    _shapes(ops, model, example)
    return ops


@torch.no_grad()
def _shapes(ops, model, example):
    """Per-example output shape of every op (run once on the example), and checks that need shapes."""
    from .dgn import run_ops

    shapes = {}
    try:
        run_ops(ops, model, model, example, record=shapes)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise NeuralpathError(
            f"the model does not run on the example input of shape {tuple(example.shape)}: " f"{first[:160]}"
        ) from None
    for i, op in enumerate(ops):
        op.shape = tuple(shapes[i].shape[1:])
        if op.kind == "flatten" and op.opts.get("check_flat"):
            src = ops[op.args[0]].shape
            n = 1
            for s in src:
                n *= s
            if op.shape != (n,):
                raise NeuralpathError(
                    f"node {op.name!r}: view/reshape to {op.shape}; only flattening to (n, -1) " "is supported"
                )
        if op.kind == "cat":
            if len({ops[a].shape[1:] for a in op.args}) != 1:
                raise NeuralpathError(f"node {op.name!r}: concatenated tensors differ beyond the channel dim")
        if op.kind == "add" and ops[op.args[0]].shape != ops[op.args[1]].shape:
            raise NeuralpathError(
                f"node {op.name!r}: adds tensors of shapes {ops[op.args[0]].shape} and "
                f"{ops[op.args[1]].shape}; broadcasting sums are not supported"
            )
