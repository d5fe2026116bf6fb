"""The device plan: which backend each stage of a job uses on the device the job was given.

One dispatch point (after gsplat and OpenSplat): stages declare here what they can use, the
pipeline configures them from the plan, and the plan is written into report.json, status.json
and /api/status, so a person sees exactly what ran where. Only backends this version implements
are listed; where a stage has no GPU implementation the reason says so instead of pretending.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from scandrop.pipeline.ingest.input_kind import InputKind

ONNX_STAGES = ("single_view", "fill")
MULTI_VIEW = ["ingest", "sparse", "depth", "fill", "fuse", "mesh", "splats", "optimise", "export", "preview"]
SINGLE_VIEW = ["ingest", "single_view", "splats", "export", "preview"]


def plan_stages(kind: InputKind | None) -> list[str]:
    """The stages a job of this input kind runs, in order."""
    if kind is InputKind.photo:
        return list(SINGLE_VIEW)
    return ["frames", *MULTI_VIEW] if kind is InputKind.video else list(MULTI_VIEW)


class StagePlan(BaseModel):
    stage: str
    backend: str
    reason: str


def _sparse(device: dict[str, Any]) -> StagePlan:
    if device.get("name") == "cuda" and device.get("pycolmap_cuda"):
        return StagePlan(stage="sparse", backend="pycolmap-cuda", reason="SIFT and matching on the GPU")
    why = "CPU device" if device.get("name") != "cuda" else "this pycolmap build has no CUDA"
    return StagePlan(stage="sparse", backend="pycolmap-cpu", reason=why)


def learned_device(device: dict[str, Any]) -> str:
    """Where the sparse stage's learned matcher (DISK + LightGlue, torch) runs: a CUDA torch if any."""
    return "cuda" if device.get("name") == "cuda" and device.get("torch_cuda") else "cpu"


def _depth(device: dict[str, Any]) -> StagePlan:
    if device.get("name") == "cuda" and device.get("pycolmap_cuda"):
        return StagePlan(
            stage="depth", backend="colmap-patchmatch-cuda", reason="PatchMatch stereo on the GPU"
        )
    why = (
        "CPU device"
        if device.get("name") != "cuda"
        else "COLMAP's PatchMatch needs the CUDA build of pycolmap"
    )
    # The CPU method follows the preset: PatchMatch (numba), or OpenCV SGBM pairs in `fast`.
    return StagePlan(stage="depth", backend="patchmatch-or-sgbm-cpu", reason=why)


def _optimise(device: dict[str, Any]) -> StagePlan:
    if device.get("name") == "cuda" and device.get("torch_cuda") and device.get("gsplat"):
        return StagePlan(stage="optimise", backend="gsplat-cuda", reason="splats trained against the photos")
    why = "CPU device" if device.get("name") != "cuda" else "needs torch with CUDA and gsplat"
    return StagePlan(stage="optimise", backend="skipped", reason=f"splats stay initialised: {why}")


def _onnx(stage: str, device: dict[str, Any]) -> StagePlan:
    if device.get("name") == "cuda" and device.get("onnxruntime_cuda"):
        return StagePlan(stage=stage, backend="onnxruntime-cuda", reason="CUDA execution provider")
    why = "CPU device" if device.get("name") != "cuda" else "onnxruntime has no CUDA provider here"
    return StagePlan(stage=stage, backend="onnxruntime-cpu", reason=why)


_CPU_ONLY = {
    "frames": ("pyav-cpu", "video decoding and keyframe analysis"),
    "ingest": ("cpu", "image decoding and checks"),
    "fuse": ("numpy-cpu", "geometric-consistency fusion"),
    "mesh": ("pycolmap-poisson-cpu", "screened Poisson has no GPU path"),
    "splats": ("initialised-cpu", "one splat per dense point, shaped by its neighbours"),
    "export": ("cpu", "file writing"),
    "preview": ("cpu", "software rendering"),
}


def build_plan(stages: list[str], device: dict[str, Any]) -> list[StagePlan]:
    """The backend of each of `stages` (a job's stage list) on `device` (models.device.DeviceInfo)."""
    plan = []
    for stage in stages:
        if stage == "sparse":
            plan.append(_sparse(device))
        elif stage == "depth":
            plan.append(_depth(device))
        elif stage == "optimise":
            plan.append(_optimise(device))
        elif stage in ONNX_STAGES:
            plan.append(_onnx(stage, device))
        else:
            backend, reason = _CPU_ONLY[stage]
            plan.append(StagePlan(stage=stage, backend=backend, reason=reason))
    return plan


def backend_device(plan: list[StagePlan], stage: str) -> str:
    """ "cuda" when the plan puts `stage` on the GPU, else "cpu"."""
    entry = next((p for p in plan if p.stage == stage), None)
    return "cuda" if entry is not None and entry.backend.endswith("-cuda") else "cpu"


def kinds_plan(device: dict[str, Any]) -> dict[str, list[StagePlan]]:
    """The plan for every kind of drop: what /api/status shows before any job runs."""
    kinds = (InputKind.photos, InputKind.video, InputKind.photo)
    return {kind.value: build_plan(plan_stages(kind), device) for kind in kinds}
