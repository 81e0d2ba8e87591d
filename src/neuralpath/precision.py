"""Arithmetic precision on GPUs: kernels are computed in full float32/float64, never TF32.

On Ampere and later GPUs PyTorch lets cuDNN convolutions (by default) and, when asked, matrix products use TF32
(10-bit mantissa). A kernel (NPK, NTK) checked to 1e-6 relative against an independent computation cannot afford
that, so :func:`exact` switches TF32 off while a kernel is computed and restores the caller's setting after. Training
keeps the caller's settings; bfloat16 autocast for training is opt-in (``--bf16``), off for reproduction.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def exact():
    """No TF32 in matrix products or cuDNN convolutions inside the block (a no-op on the CPU)."""
    mm, cd = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, cd


KERNEL_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def kernel_dtype(dtype):
    """The dtype a kernel computes in: None (the network's own), torch.float32/float64 or their names."""
    if dtype is None or dtype in KERNEL_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in KERNEL_DTYPES:
        return KERNEL_DTYPES[dtype.removeprefix("torch.")]
    from .errors import NeuralpathError

    raise NeuralpathError(
        f"dtype={dtype!r}: kernels compute in float32 or float64; pass torch.float64 (or 'float64'), or None for "
        "the network's own dtype"
    )


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast for a training step when asked, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
