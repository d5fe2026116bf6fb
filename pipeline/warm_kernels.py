"""Compile the pipeline's numba kernels before a job needs them.

numba compiles a kernel at its first call and keeps the machine code on disk (`cache=True`, in
the folder of pipeline/kernel_cache.py). Without a warm-up the first job after an install pays
for it inside its depth stage (28.5 s on an idle 2-core machine, PatchMatch above all).
`warm()` calls every kernel once on a tiny textured plane, through the functions and array types
a job uses, so that later jobs only load them; the daemon runs it at start in a child process at
the lowest CPU priority (daemon/worker.py, `warm_up`). `compiled()` lists what each kernel
was compiled for: a test checks that a real run adds nothing to what `warm()` compiled.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from numba.core.dispatcher import Dispatcher

from scandrop.pipeline.core import raster
from scandrop.pipeline.dense import fuse_depth, patchmatch_cpu, patchmatch_kernel
from scandrop.pipeline.dense.estimate_depth import DepthConfig
from scandrop.pipeline.surface import refine_mesh

KERNEL_MODULES = (patchmatch_kernel, patchmatch_cpu, fuse_depth, raster, refine_mesh)


def warm() -> float:
    """Compile (or load) every kernel; returns the seconds it took."""
    start = time.perf_counter()
    height, width, shift = 48, 64, 3
    noise = np.random.default_rng(0).uniform(0.0, 255.0, (height, width)).astype(np.float32)
    ref = cv2.GaussianBlur(noise, (0, 0), 1.0)
    src = np.roll(ref, -shift, axis=1)  # a new contiguous array
    K = np.array([[60.0, 0.0, (width - 1) / 2], [0.0, 60.0, (height - 1) / 2], [0.0, 0.0, 1.0]])
    depth = 2.0  # a fronto-parallel plane; the source camera moved along x by `shift` px of it
    R, t = np.eye(3), np.array([-shift * depth / K[0, 0], 0.0, 0.0])
    config = DepthConfig(pm_levels=2)
    images = patchmatch_cpu.ViewImages(ref, K, [src], [K], [(R, t)])
    planes = patchmatch_cpu.patchmatch_planes(images, 1.0, 4.0, config)
    own = (planes.depth, planes.normal, planes.cost)
    patchmatch_cpu.geometric_planes(images, 1.0, 4.0, config, own, [planes.depth])

    fuse_depth.warm_kernels()
    refine_mesh.warm_kernels()

    px = np.array([[1.0, 1.0], [6.0, 1.0], [1.0, 6.0]])
    raster.zbuffer(px, np.ones(3), np.array([[0, 1, 2]]), (8, 8))
    return time.perf_counter() - start


def compiled() -> dict[str, list[str]]:
    """Each kernel of the pipeline (module.name) -> the argument types it is compiled for here."""
    return {
        f"{module.__name__}.{name}": sorted(str(sig) for sig in obj.signatures)
        for module in KERNEL_MODULES
        for name, obj in vars(module).items()
        if isinstance(obj, Dispatcher)
    }


if __name__ == "__main__":
    print(f"kernels ready in {warm():.1f} s")
