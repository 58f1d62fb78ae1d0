"""The device and dtype a model runs in: `--device` and `--dtype` (or their Python arguments) read and checked.

A device must be one torch knows and this PyTorch can use; a dtype must be one the model can run in. Both
are refused with an `InputError` before a checkpoint is read or downloaded (`check_device_and_dtype`).
"""

from __future__ import annotations

import torch

from .errors import InputError, SettingError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
_DTYPE_CHOICES = f"use one of {', '.join(sorted(_DTYPES))}, the torch dtypes of those, or 'auto'"


def parse_dtype(dtype, device: torch.device, auto: str | None = None) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; "auto" -> `auto` (`checkpoint.auto_dtype`; fp32 when None); names or torch
    dtypes. fp8 and the other torch dtypes have no matmul or add here: the first forward failed deep inside."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"dtype {dtype} cannot run the model; {_DTYPE_CHOICES}")
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto":
        if auto is None:
            return torch.float32
        if str(auto).lower() not in _DTYPES:  # named as its reader knows it: dtype= in Python, --dtype in a command
            raise SettingError("", "dtype", f" 'auto': the checkpoint's dtype is {auto!r}, which this does not load "
                               "in; give ", "dtype", f" as one of {', '.join(sorted(_DTYPES))} (or their torch dtypes)")
        return _DTYPES[str(auto).lower()]
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; {_DTYPE_CHOICES}") from None


def default_device(device: str | None) -> str:
    """`device`, or CUDA when PyTorch sees it and the CPU otherwise (every command's default)."""
    return device_name(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: str | int) -> str | int:
    """A `--device` as torch names it: a bare GPU index ("1", or 1) is that CUDA GPU ("cuda:1")."""
    text = str(device)
    return f"cuda:{int(text)}" if text.isascii() and text.isdigit() else device


def parse_device(device: torch.device | str | int) -> torch.device:
    """A torch.device, refusing names torch does not know and CUDA where there is none. A bare index (0) is
    that CUDA GPU, as torch reads it on a CUDA machine."""
    try:
        device = torch.device(device_name(device))
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but this PyTorch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "meta":
        raise InputError("device 'meta' holds no data; use e.g. 'cpu' or 'cuda'")
    try:
        torch.empty(0, device=device)
    except Exception:  # mps, xla, xpu, ... on a PyTorch built without them raise various errors
        raise InputError(f"device {str(device)!r} asked for, but this PyTorch cannot use it; use e.g. 'cpu' or 'cuda'") from None
    return device


def check_device_and_dtype(device: torch.device | str, dtype) -> None:
    """Refuse a bad device or dtype before a checkpoint is read or downloaded."""
    parse_dtype(dtype, parse_device(device))
