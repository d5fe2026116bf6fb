"""The kernel warm-up compiles exactly what a job then uses: a real run compiles nothing more."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

# In a fresh interpreter (this one may have compiled kernels already): warm up, then run the real
# depth, fusion, mesh refinement and rasterisation on a tiny rendered scene, and list the kernels' signatures.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from scandrop.pipeline import warm_kernels
    from scandrop.pipeline.bench import synthetic
    from scandrop.pipeline.bench.known_poses import workspace_from_scene
    from scandrop.pipeline.core import raster
    from scandrop.pipeline.core.workspace import Workspace
    from scandrop.pipeline.dense import fuse_depth, patchmatch_cpu
    from scandrop.pipeline.dense.estimate_depth import DepthConfig
    from scandrop.pipeline.surface import refine_mesh
    import trimesh

    warm_kernels.warm()
    warmed = warm_kernels.compiled()

    primitives = synthetic.scene_primitives()
    tex = synthetic.make_texture(primitives, seed=3, spacing=0.02)
    rs, ts = synthetic.orbit_cameras(48)
    rs, ts = [rs[i] for i in (0, 1, 23, 24, 47)], [ts[i] for i in (0, 1, 23, 24, 47)]
    scene = synthetic.render_views(primitives, tex, np.full(len(primitives), 0.22), rs, ts, 200, 150)
    ws = Workspace(Path(sys.argv[1])).create()
    workspace_from_scene(scene, ws)
    patchmatch_cpu.run(DepthConfig(), ws, lambda *_: None, lambda: False)
    fused = fuse_depth.run(fuse_depth.FuseConfig(min_points=1), ws, lambda *_: None, lambda: False)
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.4)  # the scene's sphere, roughly
    refine_mesh.refine(
        ball.vertices + [-0.38, 0.4, 0.12], np.asarray(ball.faces), ws.sparse_dir, ws.images_dir,
        lambda *_: None, lambda: False,
    )
    mesh_px = np.array([[10.5, 10.0], [60.0, 12.0], [20.0, 50.0]], np.float32)
    raster.zbuffer(mesh_px, np.array([1.0, 2.0, 3.0], np.float32), np.array([[0, 1, 2]], np.uint32), (64, 64))
    json.dump({"warmed": warmed, "after": warm_kernels.compiled(), "points": fused.points}, sys.stdout)
    """
)


def test_a_job_after_the_warm_up_compiles_nothing_more(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "work")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["points"] > 1000  # the real stages ran and produced geometry
    assert result["warmed"] == result["after"]
    entry_points = (
        "sweep",
        "initialise",
        "upsample_planes",
        "ref_window_stats",
        "_agree",
        "_zbuffer_faces",
        "_best_shifts",
    )
    for name, signatures in result["warmed"].items():
        if name.endswith(entry_points):
            assert len(signatures) == 1, name  # compiled once, for the types every job passes
