"""The device plan: one place decides each stage's backend, and never claims a GPU path it lacks."""

from __future__ import annotations

from scandrop.pipeline.ingest.input_kind import InputKind
from scandrop.pipeline.plan import backend_device, build_plan, kinds_plan, plan_stages

CPU = {"name": "cpu", "torch_cuda": False, "onnxruntime_cuda": False, "pycolmap_cuda": False}
CUDA_ALL = {
    "name": "cuda",
    "torch_cuda": True,
    "onnxruntime_cuda": True,
    "pycolmap_cuda": True,
    "gsplat": True,
}
CUDA_TORCH_ONLY = {"name": "cuda", "torch_cuda": True, "onnxruntime_cuda": False, "pycolmap_cuda": False}


def test_stage_lists_per_kind() -> None:
    assert plan_stages(InputKind.photo) == ["ingest", "single_view", "splats", "export", "preview"]
    assert plan_stages(InputKind.video)[:3] == ["frames", "ingest", "sparse"]
    assert plan_stages(InputKind.photos) == plan_stages(InputKind.zip) == plan_stages(InputKind.video)[1:]


def test_cpu_plan_is_all_cpu() -> None:
    for plans in kinds_plan(CPU).values():
        assert all(not p.backend.endswith("-cuda") for p in plans)
    plan = build_plan(plan_stages(InputKind.photos), CPU)
    assert backend_device(plan, "sparse") == "cpu" and backend_device(plan, "fill") == "cpu"


def test_cuda_plan_uses_the_gpu_only_where_a_library_offers_it() -> None:
    plan = {p.stage: p for p in build_plan(plan_stages(InputKind.photos), CUDA_ALL)}
    assert plan["sparse"].backend == "pycolmap-cuda" and plan["fill"].backend == "onnxruntime-cuda"
    assert plan["depth"].backend == "colmap-patchmatch-cuda"
    assert plan["splats"].backend == "initialised-cpu" and plan["optimise"].backend == "gsplat-cuda"
    torch_only = {p.stage: p for p in build_plan(plan_stages(InputKind.photos), CUDA_TORCH_ONLY)}
    assert (
        torch_only["depth"].backend == "patchmatch-or-sgbm-cpu"
        and "CUDA build of pycolmap" in torch_only["depth"].reason
    )
    assert torch_only["optimise"].backend == "skipped" and "gsplat" in torch_only["optimise"].reason
    partial = {p.stage: p for p in build_plan(plan_stages(InputKind.photo), CUDA_TORCH_ONLY)}
    assert partial["single_view"].backend == "onnxruntime-cpu"
    assert "no CUDA provider" in partial["single_view"].reason
