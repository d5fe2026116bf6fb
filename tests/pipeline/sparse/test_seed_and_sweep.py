"""Same photos, same result; and small-baseline sweeps that the default mapper cannot start on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from scandrop.pipeline.bench import metrics, synthetic
from scandrop.pipeline.core.live_model import LiveSink
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest import ingest_images
from scandrop.pipeline.sparse import mapping, reconstruct_sparse
from scandrop.pipeline.sparse.reconstruct_sparse import SparseConfig, SparseResult


def _reconstruct(
    folder: Path, ws_dir: Path, config: SparseConfig, live: LiveSink | None = None
) -> tuple[SparseResult, pycolmap.Reconstruction]:
    ws = Workspace(ws_dir).create()
    ingested = ingest_images.run(ingest_images.IngestConfig(), folder, ws, no_progress, never_stop)
    result = reconstruct_sparse.run(config, ws, ingested.camera_groups(), no_progress, never_stop, live)
    return result, pycolmap.Reconstruction(str(ws.sparse_dir))


def _poses(rec: pycolmap.Reconstruction) -> dict[str, np.ndarray]:
    return {rec.images[i].name: rec.images[i].cam_from_world().matrix() for i in rec.reg_image_ids()}


@pytest.fixture(scope="module")
def orbit_scene() -> synthetic.SyntheticScene:
    return synthetic.render_scene(n_views=12, width=320, height=240, seed=3)


@pytest.fixture(scope="module")
def orbit(orbit_scene: synthetic.SyntheticScene, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("orbit")
    synthetic.write_scene(orbit_scene, folder)
    return folder


ORBIT_CONFIG = SparseConfig(learned="off", seed=7)


@pytest.fixture(scope="module")
def orbit_model(
    orbit: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SparseResult, pycolmap.Reconstruction]:
    return _reconstruct(orbit, tmp_path_factory.mktemp("orbit_ws"), ORBIT_CONFIG)


def test_same_photos_same_model(
    orbit: Path,
    orbit_scene: synthetic.SyntheticScene,
    orbit_model: tuple[SparseResult, pycolmap.Reconstruction],
    tmp_path: Path,
) -> None:
    first, rec1 = orbit_model
    second, rec2 = _reconstruct(orbit, tmp_path / "b", ORBIT_CONFIG)
    assert first.seed == second.seed == 7
    assert first.registered_names == second.registered_names
    # Global mapping placed all 12 here, view_001 19 degrees off and seen by no point of the model:
    # it is left out and named, and every photo that stays is where the truth has it.
    assert first.registered == 11 and first.unregistered == ["view_001.png"], first.mapping
    assert "left out 1 placed photo(s)" in first.mapping[-1].note
    est = {name: pose[:, :3] for name, pose in _poses(rec1).items()}
    truth = dict(zip(orbit_scene.names, orbit_scene.R, strict=True))
    assert max(metrics.relative_rotation_errors(est, {n: truth[n] for n in est})) < 1.0
    poses1, poses2 = _poses(rec1), _poses(rec2)
    for name, pose in poses1.items():
        np.testing.assert_allclose(pose, poses2[name], rtol=0, atol=1e-9)  # threads: last bits
    assert rec1.num_points3D() == rec2.num_points3D()


def test_streaming_the_live_model_changes_nothing(tmp_path: Path) -> None:
    """A daemon's job streams the model as it grows: COLMAP then writes snapshots, and the job's
    process is busier while COLMAP matches. With its CPU matcher on two threads that alone changed
    this orbit's raw matches (a pair got 16 or none) and its median rotation error (0.099 against
    0.102 degrees): matching now runs on one thread, as mapping does."""
    scene = synthetic.render_scene(n_views=24, width=320, height=240, seed=0)  # the daemon tests' photos
    synthetic.write_scene(scene, tmp_path / "photos")
    config = SparseConfig(learned="off")
    _, quiet = _reconstruct(tmp_path / "photos", tmp_path / "quiet", config)
    snapshots: list[float] = []
    _, streamed = _reconstruct(
        tmp_path / "photos", tmp_path / "streamed", config, lambda f, _m, _s: snapshots.append(f)
    )
    assert snapshots
    poses, streamed_poses = _poses(quiet), _poses(streamed)
    assert poses.keys() == streamed_poses.keys()
    for name, pose in poses.items():
        np.testing.assert_allclose(pose, streamed_poses[name], rtol=0, atol=1e-9)
    assert quiet.num_points3D() == streamed.num_points3D()
    assert quiet.compute_num_observations() == streamed.compute_num_observations()


def test_the_cpu_matcher_runs_on_one_thread_and_the_gpu_one_keeps_colmaps_threads() -> None:
    assert reconstruct_sparse.matching_options(SparseConfig(device="cpu")).num_threads == 1
    default = pycolmap.FeatureMatchingOptions().num_threads
    assert reconstruct_sparse.matching_options(SparseConfig(device="cuda")).num_threads == default


@pytest.fixture(scope="module")
def sweep() -> synthetic.SyntheticScene:
    # 8 views across 0.25 units at 2.7 away: at most about 5 degrees between any two views
    return synthetic.render_scene(n_views=8, width=320, height=240, seed=5, path="sweep", baseline=0.25)


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_facing_sweep_is_placed_completely(
    sweep: synthetic.SyntheticScene, tmp_path: Path, seed: int
) -> None:
    synthetic.write_scene(sweep, tmp_path / "photos")
    result, rec = _reconstruct(tmp_path / "photos", tmp_path / "ws", SparseConfig(learned="off", seed=seed))
    assert result.registered == len(sweep.names), (result.unregistered, result.mapping)
    assert result.mapping[-1].registered == len(sweep.names)  # report.json says which mapping placed them
    est = {name: pose[:, :3] for name, pose in _poses(rec).items()}
    errors = metrics.relative_rotation_errors(est, dict(zip(sweep.names, sweep.R, strict=True)))
    # a 5-degree sweep at 320 px (f = 307 px) leaves rotation and translation poorly separated:
    # tenths of a degree is what SfM gets here; a failed or wrong placement is tens of degrees
    assert np.median(errors) < 1.0, result.mapping


def test_global_model_is_adjusted_back_onto_its_matches(tmp_path: Path) -> None:
    """GLOMAP left the 3-view barn's poses degrees off its own verified matches; the refinement
    (retriangulate with two-view tracks, bundle adjust) must bring a model in that state back to
    the true relative rotations, and say so."""
    scene = synthetic.render_scene(n_views=24, width=480, height=360, seed=2)
    synthetic.write_scene(scene, tmp_path / "photos")
    kept = [scene.names[k] for k in (0, 1, 12)]  # 0 and 30 degrees round, 15 degrees higher up
    for name in set(scene.names) - set(kept):
        (tmp_path / "photos" / name).unlink()
    result, rec = _reconstruct(tmp_path / "photos", tmp_path / "ws", SparseConfig(learned="off"))
    assert result.registered == 3
    truth = {name: r for name, r in zip(scene.names, scene.R, strict=True) if name in kept}

    def median_error(model: pycolmap.Reconstruction) -> float:
        est = {name: pose[:, :3] for name, pose in _poses(model).items()}
        return float(np.median(metrics.relative_rotation_errors(est, truth)))

    mapped = median_error(rec)
    image = rec.images[rec.reg_image_ids()[1]]  # turn one camera by 3 degrees, as GLOMAP left the barn's
    frame = rec.frames[image.frame_id]
    turn = pycolmap.Rotation3d(np.array([0.0, np.sin(np.radians(1.5)), 0.0, np.cos(np.radians(1.5))]))
    frame.rig_from_world = pycolmap.Rigid3d(turn, np.zeros(3)) * frame.rig_from_world
    assert median_error(rec) > 1.0
    ws = Workspace(tmp_path / "ws")
    refined, note = mapping.refine_global_model(rec, ws.database, ws.images_dir, tmp_path / "raw", 0, 3)
    assert refined.num_reg_images() == 3
    # measured: 0.05 degrees as incremental mapping left it, 2.0 turned, 0.11 refined
    assert median_error(refined) < 0.15, (note, mapped)
    assert note.startswith("bundle adjusted again") and "not kept" not in note


def test_photos_that_too_few_points_tie_to_are_taken_out(
    orbit_model: tuple[SparseResult, pycolmap.Reconstruction],
) -> None:
    """A global model can hold a photo whose matches made no point (the room, learned pairs: 5 of
    8 placed photos seen by 0-2 points). Such a photo leaves the model; the others stay as they were."""
    rec = pycolmap.Reconstruction(orbit_model[1])  # a copy: the fixture's model is shared
    placed = rec.num_reg_images()
    weak = rec.reg_image_ids()[4]
    tied = [k for k, point in enumerate(rec.image(weak).points2D) if point.has_point3D()]
    for k in tied[2:]:  # two points left, as the room's learned photos had
        rec.delete_observation(weak, k)
    before = _poses(rec)
    assert mapping.drop_unsupported_photos(rec, 15) == 1
    assert weak not in rec.reg_image_ids() and rec.num_reg_images() == placed - 1
    for i in rec.reg_image_ids():
        assert rec.image(i).num_points3D >= 15
        np.testing.assert_array_equal(rec.image(i).cam_from_world().matrix(), before[rec.image(i).name])
    assert mapping.drop_unsupported_photos(rec, 15) == 0
