"""optimise_splats: the CPU reference rasteriser renders known cases right, and the training loop
recovers a known scene from a perturbed start (gsplat itself needs CUDA and is not run here)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="splat optimisation needs PyTorch (CPU build is enough here)")

from scandrop.pipeline.core.errors import ErrorCode, ScandropError  # noqa: E402
from scandrop.pipeline.core.pointcloud import PointCloud, save_points  # noqa: E402
from scandrop.pipeline.core.stage import never_stop, no_progress  # noqa: E402
from scandrop.pipeline.core.workspace import Workspace  # noqa: E402
from scandrop.pipeline.surface import make_splats  # noqa: E402
from scandrop.pipeline.surface.optimise_splats import (  # noqa: E402
    OptimiseConfig,
    Params,
    from_npz,
    gsplat_rasterize,
    optimise,
    photometric_loss,
    reference_rasterize,
    to_npz,
)
from scandrop.pipeline.surface.optimise_splats import run as optimise_run  # noqa: E402

W, H = 64, 48
K = torch.tensor([[50.0, 0.0, 32.0], [0.0, 50.0, 24.0], [0.0, 0.0, 1.0]])
IDENTITY_QUAT = torch.tensor([1.0, 0.0, 0.0, 0.0])


def splats(means: list[list[float]], scale: float, opacity: float, colours: list[list[float]]) -> tuple:
    n = len(means)
    return (
        torch.tensor(means),
        IDENTITY_QUAT.expand(n, 4).clone(),
        torch.full((n, 3), scale),
        torch.full((n,), opacity),
        torch.tensor(colours),
    )


def look_at(centre: np.ndarray) -> torch.Tensor:
    """World-to-camera (OpenCV axes) for a camera at `centre` looking at the origin, world +y up."""
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    viewmat = np.eye(4)
    viewmat[:3, :3] = np.stack([right, down, forward])
    viewmat[:3, 3] = -viewmat[:3, :3] @ centre
    return torch.from_numpy(viewmat.astype(np.float32))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_one_splat_lands_at_its_projection() -> None:
    # u = 50 * 0.1 / 2 + 32 = 34.5 -> column 34; v = 50 * -0.05 / 2 + 24 = 22.75 -> row 22.
    image = reference_rasterize(
        *splats([[0.1, -0.05, 2.0]], 0.02, 0.9, [[1.0, 0.0, 0.0]]), torch.eye(4), K, W, H
    )
    assert image.shape == (H, W, 3)
    row, col = np.unravel_index(int(torch.argmax(image[..., 0])), (H, W))
    assert (row, col) == (22, 34)
    assert 0.6 < float(image[22, 34, 0]) <= 0.9 and float(image[..., 1:].abs().max()) == 0.0
    assert float(image[0, 0, 0]) < 1e-6  # far from the splat: nothing


def test_nearer_splat_wins_whatever_the_input_order() -> None:
    far_red, near_green = [0.0, 0.0, 4.0], [0.0, 0.0, 2.0]
    for means, colours in (
        ([far_red, near_green], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        ([near_green, far_red], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    ):
        image = reference_rasterize(*splats(means, 0.5, 0.99, colours), torch.eye(4), K, W, H)
        centre = image[24, 32]
        assert float(centre[1]) > 0.98 and float(centre[0]) < 0.02


def test_splat_behind_the_camera_contributes_nothing() -> None:
    background = torch.tensor([0.2, 0.4, 0.6])
    args = splats([[0.0, 0.0, -2.0]], 0.5, 0.99, [[1.0, 1.0, 1.0]])
    image = reference_rasterize(*args, torch.eye(4), K, W, H, background=background)
    torch.testing.assert_close(image, background.expand(H, W, 3))


def random_scene(n: int, seed: int, anisotropic: bool = False) -> Params:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.full((n, 3), 0.12)
    if anisotropic:
        scales = scales * (0.5 + torch.rand(n, 3, generator=gen))
    quats = torch.randn(n, 4, generator=gen) if anisotropic else IDENTITY_QUAT.expand(n, 4).clone()
    return Params(
        means=torch.rand(n, 3, generator=gen) * 2 - 1,
        log_scales=scales.log(),
        quats=quats,
        opacity_logits=torch.full((n,), 1.5),  # sigmoid = 0.82
        colour_logits=torch.randn(n, 3, generator=gen) * 1.5,
    )


def cameras(count: int) -> list[torch.Tensor]:
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return [look_at(np.array([4 * np.sin(a), 1.2 * np.cos(3 * a), 4 * np.cos(a)])) for a in angles]


def test_gradients_reach_every_parameter() -> None:
    p = random_scene(40, seed=1, anisotropic=True).trainable("cpu")
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(2))
    render = reference_rasterize(*p.activated(), cameras(1)[0], K, W, H)
    photometric_loss(render, target, 0.2).backward()
    for name, tensor in zip(("means", "log_scales", "quats", "opacity", "colours"), p.tensors(), strict=True):
        grad = tensor.grad
        assert grad is not None and bool(torch.isfinite(grad).all()), name
        assert float(grad.abs().max()) > 0, name


def visible_splats(truth: Params, views: list[tuple], min_pixels: float = 20.0) -> torch.Tensor:
    """Splats whose blend weight, summed over all views, is worth >= `min_pixels` full pixels.

    The render is linear in the colours, so d(sum of all renders)/d(colours) is that weight.
    Hidden splats get no gradient, so their colours cannot be recovered and are not scored.
    """
    p = truth.trainable("cpu")
    means, quats, scales, opacities, _ = p.activated()
    colours = torch.sigmoid(p.colour_logits).detach().requires_grad_(True)
    total = sum(
        reference_rasterize(means, quats, scales, opacities, colours, vm, K, W, H).sum() for _, vm, _ in views
    )
    (weight,) = torch.autograd.grad(total, colours)
    return weight[:, 0] >= min_pixels


def test_training_recovers_a_known_scene() -> None:
    n = 100
    truth = random_scene(n, seed=3)
    with torch.no_grad():
        views = [(reference_rasterize(*truth.activated(), vm, K, W, H), vm, K) for vm in cameras(5)]
    visible = visible_splats(truth, views)
    gen = torch.Generator().manual_seed(4)
    start = Params(
        means=truth.means + 0.06 * torch.randn(n, 3, generator=gen),  # 3 % of the 2-unit box
        log_scales=truth.log_scales + np.log(1.5),
        quats=truth.quats.clone(),
        opacity_logits=torch.full((n,), -0.5),  # 0.82 -> 0.38
        colour_logits=torch.randn(n, 3, generator=gen) * 1.5,
    )

    def mean_psnr(p: Params) -> float:
        with torch.no_grad():
            return float(
                np.mean([psnr(reference_rasterize(*p.activated(), vm, K, W, H), img) for img, vm, _ in views])
            )

    def colour_error(p: Params) -> float:
        diff = torch.sigmoid(p.colour_logits) - torch.sigmoid(truth.colour_logits)
        return float(diff[visible].abs().mean())

    # Learning rates above the 2000-step defaults so that 150 steps suffice.
    config = OptimiseConfig(
        iterations=150, lr_means=2e-3, lr_scales=1e-2, lr_opacity=5e-2, lr_colours=1e-1, log_every=50
    )
    start_means = start.means.clone()
    reports: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    trained, losses = optimise(
        start, views, reference_rasterize, config, progress=lambda f, m: reports.append((f, m))
    )
    seconds = time.perf_counter() - t0

    before, after = mean_psnr(start), mean_psnr(trained)
    colour_before, colour_after = colour_error(start), colour_error(trained)
    print(
        f"PSNR {before:.2f} -> {after:.2f} dB, colour error ({int(visible.sum())} visible splats) "
        f"{colour_before:.3f} -> {colour_after:.3f}, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"{seconds:.1f} s"
    )
    assert int(visible.sum()) >= 0.8 * n
    assert len(losses) == 150 and [round(f, 3) for f, _ in reports] == [0.333, 0.667, 1.0]
    assert after - before >= 6.0
    assert colour_after < 0.5 * colour_before
    assert torch.equal(start.means, start_means)  # the caller's parameters are not modified


def test_stop_request_cancels_training() -> None:
    p = random_scene(10, seed=5)
    views = [(torch.zeros(H, W, 3), cameras(1)[0], K)]
    with pytest.raises(ScandropError) as err:
        optimise(p, views, reference_rasterize, OptimiseConfig(iterations=5), should_stop=lambda: True)
    assert err.value.code is ErrorCode.cancelled


def test_npz_round_trip_keeps_make_splats_layout(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "job").create()
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(3000, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    rgb = rng.integers(0, 256, size=(3000, 3)).astype(np.uint8)
    rgb[:2] = [[0, 0, 0], [255, 255, 255]]
    save_points(ws.fused, PointCloud(xyz.astype(np.float32), xyz.astype(np.float32), rgb))
    make_splats.run(make_splats.SplatConfig(max_splats=3000), ws, no_progress, never_stop)
    with np.load(ws.splats) as s:
        original = {k: s[k] for k in s.files}

    out = tmp_path / "round_trip.npz"
    to_npz(from_npz(ws.splats), out)
    with np.load(out) as s:
        back = {k: s[k] for k in s.files}
    assert back.keys() == original.keys()
    for key in original:
        assert back[key].dtype == original[key].dtype and back[key].shape == original[key].shape, key
    np.testing.assert_array_equal(back["rgb"], original["rgb"])
    np.testing.assert_allclose(back["xyz"], original["xyz"], atol=1e-6)
    np.testing.assert_allclose(back["scales"], original["scales"], rtol=1e-5)
    np.testing.assert_allclose(back["quats"], original["quats"], atol=1e-6)
    np.testing.assert_allclose(back["opacity"], original["opacity"], atol=1e-6)


def test_gsplat_missing_is_device_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gsplat", None)  # makes `import gsplat` fail even where installed
    args = splats([[0.0, 0.0, 2.0]], 0.1, 0.9, [[1.0, 1.0, 1.0]])
    with pytest.raises(ScandropError) as err:
        gsplat_rasterize(*args, torch.eye(4), K, W, H)
    assert err.value.code is ErrorCode.device_unavailable and "pip install gsplat" in err.value.hint


def test_stage_refuses_a_cpu_device(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "job").create()
    with pytest.raises(ScandropError) as err:
        optimise_run(OptimiseConfig(), ws, "cpu", no_progress, never_stop)
    assert err.value.code is ErrorCode.device_unavailable
