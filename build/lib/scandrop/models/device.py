"""Device selection: find what the machine offers, resolve a request once per job, say why.

CUDA-capable packages are imported lazily so a CPU-only box never loads them, and a long-running
process probes in a throwaway child (`resolve_device_in_child`) so it never holds them at all
(torch alone is several hundred MB resident).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from enum import StrEnum

from pydantic import BaseModel

from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo, ScandropError


class DeviceRequest(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DeviceInfo(BaseModel):
    name: str  # "cpu" or "cuda"
    reason: str
    torch_cuda: bool
    onnxruntime_cuda: bool
    pycolmap_cuda: bool
    torch_mps: bool = False
    gsplat: bool = False  # gsplat importable (splat optimisation on CUDA)


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # lazy: large import, optional extra

    return bool(torch.cuda.is_available())


def _torch_mps() -> bool:
    """Apple-silicon GPU through torch; detected and reported, used by no stage yet."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


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
    flags["gsplat"] = importlib.util.find_spec("gsplat") is not None
    mps = _torch_mps()
    if request == DeviceRequest.cpu:
        return DeviceInfo(name="cpu", reason="requested", torch_mps=mps, **flags)
    if request == DeviceRequest.mps:
        if not mps:
            raise ScandropError(
                ErrorCode.device_unavailable,
                "MPS (Apple GPU) was requested but torch sees none on this machine.",
                "Use --device cpu or auto.",
            )
        return DeviceInfo(
            name="mps",
            reason="requested; no stage has an MPS path yet, they run on the CPU",
            torch_mps=mps,
            **flags,
        )
    if request == DeviceRequest.cuda:
        if not any_cuda:
            raise ScandropError(
                ErrorCode.device_unavailable,
                "CUDA was requested but no CUDA device is usable (torch, onnxruntime and pycolmap see none).",
                "Use --device cpu or auto, or install the CUDA builds (see README, 'GPU').",
            )
        return DeviceInfo(name="cuda", reason="requested", torch_mps=mps, **flags)
    if any_cuda:
        return DeviceInfo(name="cuda", reason="auto: a CUDA device is usable", torch_mps=mps, **flags)
    why = "auto: no CUDA device found" + ("; MPS found but no stage uses it yet" if mps else "")
    return DeviceInfo(name="cpu", reason=why, torch_mps=mps, **flags)


def resolve_device_in_child(request: DeviceRequest | str = DeviceRequest.auto) -> DeviceInfo:
    """resolve_device, run in a separate interpreter; raises the same errors."""
    done = subprocess.run(
        [sys.executable, "-m", "scandrop.models.device", str(DeviceRequest(request))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ScandropError(
            ErrorCode.internal_error,
            f"The device probe failed (exit {done.returncode}): {done.stderr.strip()[-300:]}",
            "This is a bug or a broken install: reinstall scandrop and its dependencies.",
        ) from None
    if "error" in answer:
        error = ErrorInfo.model_validate(answer["error"])
        raise ScandropError(error.code, error.message, error.hint)
    return DeviceInfo.model_validate(answer)


if __name__ == "__main__":
    try:
        print(resolve_device(sys.argv[1] if len(sys.argv) > 1 else "auto").model_dump_json())
    except ScandropError as exc:
        print(json.dumps({"error": exc.info().model_dump(mode="json")}))
