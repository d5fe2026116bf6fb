"""A single photo -> relief, with a stand-in depth network built by the test (no weights here).

The stand-in is a tiny ONNX graph with Depth Anything's inputs and outputs whose answer is the
rendered object's true inverse depth, distorted by a scale and shift the code does not know, as a
real network's relative depth is. The relief must then follow the true surface up to that affine
ambiguity, stay inside the photo's alpha mask, and come with a camera that sees it where it was.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pycolmap
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from scandrop.models.mono_depth import MonoDepth, network_size
from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.presets import resolve
from scandrop.pipeline.run import run_pipeline
from scandrop.pipeline.surface import single_view

W, H = 448, 336


def _true_depth(scene: synthetic.SyntheticScene, view: int) -> np.ndarray:
    """Camera z of the surface at each pixel centre (inf where the ray misses)."""
    k, r, t = scene.K, scene.R[view], scene.t[view]
    u, v = np.meshgrid(np.arange(scene.width) + 0.5, np.arange(scene.height) + 0.5)
    d_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    norm = np.linalg.norm(d_cam, axis=1)
    dist, _ = synthetic.cast_rays(scene.primitives, -r.T @ t, (d_cam / norm[:, None]) @ r)
    return (dist / norm).reshape(scene.height, scene.width)


def _stand_in_model(path: Path, inverse: np.ndarray) -> Path:
    """pixel_values [1,3,h,w] -> predicted_depth [1,h,w] = the given map (input shape must match)."""
    h, w = inverse.shape
    const = numpy_helper.from_array(inverse[None].astype(np.float32), "answer")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "answer"], ["predicted_depth"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stand_in_depth",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, [1, h, w])],
        initializer=[const, zero],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    """(folder with one RGBA photo, its true depth, the stand-in model)."""
    root = tmp_path_factory.mktemp("single")
    scene = synthetic.render_scene(n_views=2, width=W, height=H, seed=3, alpha=True)
    folder = root / "photo"
    folder.mkdir()
    Image.fromarray(scene.images[0]).save(folder / "object.png")
    z = _true_depth(scene, 0)
    inverse = np.where(np.isfinite(z), 1.0 / np.where(np.isfinite(z), z, 1.0), 0.0)
    scale, shift = 7.3, 0.42  # unknown to the code, as for a real network
    net_h, net_w = network_size(H, W)
    answer = cv2.resize(scale * inverse + shift, (net_w, net_h), interpolation=cv2.INTER_LINEAR)
    return folder, z, _stand_in_model(root / "stand_in.onnx", answer)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, photo: tuple[Path, np.ndarray, Path]) -> None:
    model = photo[2]
    monkeypatch.setattr(single_view, "load_model", lambda config, device: MonoDepth(model, device))


def test_relief_follows_the_true_surface_inside_the_mask(
    tmp_path: Path, photo: tuple[Path, np.ndarray, Path], stand_in: None
) -> None:
    folder, z_true, _ = photo
    report = run_pipeline(
        folder / "object.png", tmp_path / "out", resolve(JobSpec(preset="fast")), tmp_path / "w"
    )
    assert report.ok, report.error
    view = next(s.result for s in report.stages if s.name == "single_view")
    assert view["masked"] and view["triangles"] > 10_000
    ws = Workspace(tmp_path / "w")
    rec = pycolmap.Reconstruction(str(ws.sparse_dir))
    image = rec.image(1)
    cam = rec.camera(image.camera_id)
    assert (cam.width, cam.height) == (W, H)
    cloud = load_points(ws.fused)
    pose = image.cam_from_world()
    in_cam = cloud.xyz.astype(np.float64) @ pose.rotation.matrix().T + pose.translation
    assert (in_cam[:, 2] > 0).all(), "the relief must lie in front of its camera"
    fx, fy, cx, cy = cam.params
    u = fx * in_cam[:, 0] / in_cam[:, 2] + cx
    v = fy * in_cam[:, 1] / in_cam[:, 2] + cy
    px = np.clip(np.round(u - 0.5).astype(int), 0, W - 1), np.clip(np.round(v - 0.5).astype(int), 0, H - 1)
    seen = np.isfinite(z_true)[px[1], px[0]]
    assert seen.mean() > 0.98, f"{1 - seen.mean():.1%} of the relief lies outside the object"
    # Up to the affine ambiguity in inverse depth, the relief is the true surface.
    inv_relief, inv_true = 1.0 / in_cam[seen, 2], 1.0 / z_true[px[1][seen], px[0][seen]]
    assert np.corrcoef(inv_relief, inv_true)[0, 1] > 0.99
    for name in ("model.glb", "points.ply", "splats.splat", "cameras/transforms.json", "preview.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert report.kind == "single_photo" and "single-view" in (report.single_view or {})["note"]


def test_without_the_model_the_job_says_how_to_install_it(
    tmp_path: Path, photo: tuple[Path, np.ndarray, Path]
) -> None:
    config = JobSpec(preset="fast", overrides={"single_view": {"models_dir": str(tmp_path / "none")}})
    report = run_pipeline(photo[0] / "object.png", tmp_path / "out", resolve(config), tmp_path / "w")
    assert not report.ok and report.error is not None
    assert report.error.code == ErrorCode.model_missing
    assert "scandrop models pull depth-anything-v2-small" in report.error.hint
    assert not (tmp_path / "out" / "model.glb").exists()


def test_a_flat_answer_is_refused_not_turned_into_a_surface() -> None:
    with pytest.raises(ScandropError) as err:
        single_view.relief_depth(np.full((8, 8), 0.5, np.float32), np.ones((8, 8), bool), 1.5)
    assert err.value.code == ErrorCode.dense_failed


def test_depth_jumps_cut_the_grid() -> None:
    depth = np.ones((4, 6), np.float32)
    depth[:, 3:] = 2.0  # a step between columns 2 and 3
    faces = single_view.grid_mesh(depth, np.ones_like(depth, bool), max_jump=0.05)
    assert len(faces) == 2 * 3 * 4  # 5 cells per row minus the one across the step, times 3 rows
    cols = faces % 6
    assert not ((cols.min(axis=1) <= 2) & (cols.max(axis=1) >= 3)).any()


@pytest.mark.parametrize(
    ("pixels", "why"),
    [
        (np.zeros((1, 1, 3), np.uint8), "too small"),
        (np.zeros((200, 200, 4), np.uint8), "fully transparent"),  # alpha 0 everywhere
    ],
)
def test_a_broken_single_photo_fails_clearly(tmp_path: Path, pixels: np.ndarray, why: str) -> None:
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    report = run_pipeline(
        tmp_path / "photo.png", tmp_path / "out", resolve(JobSpec(preset="fast")), tmp_path / "w"
    )
    assert not report.ok and report.error is not None
    assert report.error.code == ErrorCode.too_few_images
    assert why in report.error.message and report.error.hint
