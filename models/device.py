"""Device selection: find what the machine offers, resolve a request once per job, say why.

CUDA-capable packages are imported lazily so a CPU-only box never loads them.
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum

from pydantic import BaseModel

from pipeline.errors import ErrorCode, ScandropError


class DeviceRequest(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DeviceInfo(BaseModel):
    name: str  # "cpu" or "cuda"
    reason: str
    torch_cuda: bool
    onnxruntime_cuda: bool
    pycolmap_cuda: bool


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # lazy: large import, optional extra

    return bool(torch.cuda.is_available())


def _onnxruntime_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _pycolmap_cuda() -> bool:
    import pycolmap

    return bool(getattr(pycolmap, "has_cuda", False))


def resolve_device(request: DeviceRequest | str = DeviceRequest.auto) -> DeviceInfo:
    """The device a job runs on; an explicit request that cannot be met is an error, not a fallback."""
    request = DeviceRequest(request)
    flags = {
        "torch_cuda": _torch_cuda(),
        "onnxruntime_cuda": _onnxruntime_cuda(),
        "pycolmap_cuda": _pycolmap_cuda(),
    }
    any_cuda = any(flags.values())
    if request == DeviceRequest.cpu:
        return DeviceInfo(name="cpu", reason="requested", **flags)
    if request == DeviceRequest.cuda:
        if not any_cuda:
            raise ScandropError(
                ErrorCode.device_unavailable,
                "CUDA was requested but no CUDA device is usable (torch, onnxruntime and pycolmap see none).",
                "Use --device cpu or auto, or install the CUDA builds (see README, 'GPU').",
            )
        return DeviceInfo(name="cuda", reason="requested", **flags)
    if any_cuda:
        return DeviceInfo(name="cuda", reason="auto: a CUDA device is usable", **flags)
    return DeviceInfo(name="cpu", reason="auto: no CUDA device found", **flags)
