"""Stage (CUDA only): optimise the initialised splats (ws.splats) against the photos.

make_splats places one flat splat per dense point; this stage trains them the way 3D Gaussian
Splatting does, minus densification: Adam on means, log-scales, quaternions, opacity logits and
colour logits with per-group learning rates, loss (1 - λ) L1 + λ (1 - SSIM) against each view.

The loop is independent of the rasteriser. On CUDA it uses gsplat's tile rasteriser; the plain
torch `reference_rasterize` (every splat at every pixel) is the CPU reference that the loop is
tested with, and is only for tiny scenes. torch is imported inside functions, so importing this
module works on installs without torch.

Parameterisation (what the optimiser sees; the activated values go to the rasteriser):
    means (N, 3) world; log_scales (N, 3), scales = exp; quats (N, 4) w, x, y, z, normalised in
    use; opacity_logits (N,), opacity = sigmoid; colour_logits (N, 3), colour = sigmoid in [0, 1].
Colours use a sigmoid rather than a clamp so a colour pushed to 0 or 1 still gets gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop, never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace

if TYPE_CHECKING:
    import torch

METHOD = "optimised against the photos with gsplat (L1 + SSIM, no densification)"
_COLOUR_EPS = 0.25 / 255  # keeps uint8 0 and 255 finite as logits and round-trips them exactly
_OPACITY_EPS = 1e-4
_NEAR = 0.01


class OptimiseConfig(BaseModel):
    """How splats are trained against the photos. Defaults are the balanced preset (3DGS-like)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iterations: int = Field(2000, ge=1, description="Optimiser steps; each renders one view.")
    lr_means: float = Field(
        1.6e-4, gt=0.0, description="Learning rate of the means, times the scene extent (decays 100x)."
    )
    lr_scales: float = Field(5e-3, gt=0.0, description="Learning rate of the log-scales.")
    lr_quats: float = Field(1e-3, gt=0.0, description="Learning rate of the (unnormalised) quaternions.")
    lr_opacity: float = Field(5e-2, gt=0.0, description="Learning rate of the opacity logits.")
    lr_colours: float = Field(2.5e-3, gt=0.0, description="Learning rate of the colour logits.")
    ssim_weight: float = Field(0.2, ge=0.0, le=1.0, description="λ in (1 - λ) L1 + λ (1 - SSIM).")
    log_every: int = Field(100, ge=1, description="Iterations between progress reports.")
    seed: int = Field(0, description="Seed of the view order, so runs are repeatable.")


class OptimiseResult(BaseModel):
    splats: int
    views: int
    iterations: int
    first_loss: float
    last_loss: float
    method: str = METHOD
    seconds: float


@dataclass
class Params:
    """Splat parameters in the optimiser's parameterisation (see the module docstring)."""

    means: torch.Tensor
    log_scales: torch.Tensor
    quats: torch.Tensor
    opacity_logits: torch.Tensor
    colour_logits: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.means, self.log_scales, self.quats, self.opacity_logits, self.colour_logits]

    def trainable(self, device: str) -> Params:
        """Fresh leaf copies on `device` that require gradients (the inputs stay untouched)."""
        return Params(*(t.detach().to(device).clone().requires_grad_(True) for t in self.tensors()))

    def detached(self) -> Params:
        return Params(*(t.detach().cpu().clone() for t in self.tensors()))

    def activated(self) -> tuple[torch.Tensor, ...]:
        """(means, unit quats, linear scales, opacities, colours in [0, 1]): what rasterisers take."""
        import torch

        quats = torch.nn.functional.normalize(self.quats, dim=-1)
        return (
            self.means,
            quats,
            torch.exp(self.log_scales),
            torch.sigmoid(self.opacity_logits),
            torch.sigmoid(self.colour_logits),
        )


class Rasterize(Protocol):
    """Render one view: activated splats, world-to-camera `viewmat` (4, 4), pinhole `K` (3, 3).

    means (N, 3), quats (N, 4) unit wxyz, scales (N, 3) linear, opacities (N,) in [0, 1],
    colours (N, 3) in [0, 1]; background (3,) or None for black. Returns (height, width, 3).
    Pixel (i, j) has its centre at u = j + 0.5, v = i + 0.5 (gsplat's convention).
    """

    def __call__(
        self,
        means: torch.Tensor,
        quats: torch.Tensor,
        scales: torch.Tensor,
        opacities: torch.Tensor,
        colours: torch.Tensor,
        viewmat: torch.Tensor,
        K: torch.Tensor,
        width: int,
        height: int,
        background: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


View = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]
"""(image (H, W, 3) float in [0, 1], viewmat (4, 4) world-to-camera, K (3, 3))."""


def from_npz(path: Path) -> Params:
    """Read make_splats' file (xyz, scales linear, quats wxyz, rgb uint8, opacity) as Params."""
    import torch

    with np.load(path) as s:
        xyz, scales, quats = s["xyz"], s["scales"], s["quats"]
        rgb, opacity = s["rgb"], s["opacity"]
    colours = np.clip(rgb.astype(np.float64) / 255.0, _COLOUR_EPS, 1 - _COLOUR_EPS)
    opacity = np.clip(opacity.astype(np.float64), _OPACITY_EPS, 1 - _OPACITY_EPS)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Params(
        means=tensor(xyz),
        log_scales=tensor(np.log(np.maximum(scales.astype(np.float64), 1e-12))),
        quats=tensor(quats),
        opacity_logits=tensor(np.log(opacity / (1 - opacity))),
        colour_logits=tensor(np.log(colours / (1 - colours))),
    )


def to_npz(params: Params, path: Path) -> None:
    """Write Params atomically in make_splats' layout (unit quats with w >= 0, rgb uint8)."""
    import torch

    with torch.no_grad():
        means, quats, scales, opacities, colours = (
            t.detach().cpu().double().numpy() for t in params.activated()
        )
    quats = quats.copy()
    quats[quats[:, 0] < 0] *= -1
    rgb = np.clip(np.rint(colours * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            xyz=means.astype(np.float32),
            scales=scales.astype(np.float32),
            quats=quats.astype(np.float32),
            rgb=rgb,
            opacity=opacities.astype(np.float32),
        )


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(N, 4) unit wxyz -> (N, 3, 3) rotations."""
    import torch

    w, x, y, z = quats.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def reference_rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colours: torch.Tensor,
    viewmat: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable plain-torch splat renderer: the CPU reference for tests and tiny scenes.

    It evaluates every splat at every pixel, O(pixels x splats) time and memory (64x48 px x 300
    splats is ~1M terms), so it is not for real scenes. Same model as 3DGS/gsplat: splats with
    camera z <= near are dropped; EWA projection Σ2D = J W Σ Wᵀ Jᵀ + 0.3 I; alpha = opacity *
    exp(-½ dᵀ Σ2D⁻¹ d) clamped at 0.99; front-to-back compositing by camera depth over `background`.
    Unlike gsplat there is no 1/255 alpha cut-off and no tile culling, so it is smooth everywhere.
    """
    import torch

    rot_w, t_w = viewmat[:3, :3], viewmat[:3, 3]
    cam = means @ rot_w.T + t_w
    keep = cam[:, 2] > _NEAR
    cam, quats, scales = cam[keep], quats[keep], scales[keep]
    opacities, colours = opacities[keep], colours[keep]
    order = torch.argsort(cam[:, 2])
    cam, quats, scales = cam[order], quats[order], scales[order]
    opacities, colours = opacities[order], colours[order]

    x, y, z = cam.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [torch.stack([fx / z, zero, -fx * x / z**2], -1), torch.stack([zero, fy / z, -fy * y / z**2], -1)],
        dim=-2,
    )
    rs = quat_to_rotmat(quats) * scales[:, None, :]  # R S: column i scaled by scale i
    cov3 = rs @ rs.transpose(-1, -2)
    tw = jac @ rot_w
    cov2 = tw @ cov3 @ tw.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=means.dtype, device=means.device)
    a, b, c = cov2[:, 0, 0], cov2[:, 0, 1], cov2[:, 1, 1]
    det = a * c - b * b

    vs, us = torch.meshgrid(
        torch.arange(height, dtype=means.dtype, device=means.device) + 0.5,
        torch.arange(width, dtype=means.dtype, device=means.device) + 0.5,
        indexing="ij",
    )
    du = us.reshape(-1, 1) - mean2d[:, 0]  # (P, N)
    dv = vs.reshape(-1, 1) - mean2d[:, 1]
    power = -0.5 * (c * du * du - 2 * b * du * dv + a * dv * dv) / det
    alpha = torch.clamp(opacities * torch.exp(power), max=0.99)
    ones = torch.ones(alpha.shape[0], 1, dtype=alpha.dtype, device=alpha.device)
    trans = torch.cumprod(torch.cat([ones, 1 - alpha], dim=1), dim=1)  # T before each splat, then after
    image = (alpha * trans[:, :-1]) @ colours
    if background is not None:
        image = image + trans[:, -1:] * background
    return image.reshape(height, width, 3)


def gsplat_rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colours: torch.Tensor,
    viewmat: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CUDA rasteriser: gsplat.rasterization for one camera, (H, W, 3).

    NOT RUN here: gsplat needs CUDA and is not installed on the CPU machines this was written
    on; its call follows gsplat's API reference (rasterization(means, quats, scales, opacities,
    colors, viewmats [C,4,4], Ks [C,3,3], width, height, backgrounds [C,3]) -> (colors
    [C,H,W,3], alphas [C,H,W,1], meta)). reference_rasterize implements the same model.
    """
    try:
        import gsplat
    except ImportError as exc:
        raise ScandropError(
            ErrorCode.device_unavailable,
            "Training splats needs gsplat, which is not installed.",
            "On a machine with an NVIDIA GPU and CUDA run `pip install gsplat`; without one the splats "
            "stay as initialised from the dense points.",
        ) from exc
    backgrounds = None if background is None else background[None]
    render, _alphas, _meta = gsplat.rasterization(
        means,
        quats,
        scales,
        opacities,
        colours,
        viewmat[None],
        K[None],
        width,
        height,
        backgrounds=backgrounds,
    )
    return render[0]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two (H, W, 3) images in [0, 1], Gaussian window, valid region only."""
    import torch

    coords = torch.arange(window, dtype=a.dtype, device=a.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window).contiguous()

    def blur(img: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(img, kernel, groups=3)

    x, y = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean()


def photometric_loss(render: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """(1 - λ) L1 + λ (1 - SSIM), the 3DGS loss."""
    l1 = (render - target).abs().mean()
    if ssim_weight == 0:
        return l1
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim(render, target))


def scene_extent(means: torch.Tensor, views: list[View]) -> float:
    """3DGS's scale for position learning rates: 1.1 x the camera centres' radius (else the splats')."""
    import torch

    centres = torch.stack([-(v[1][:3, :3].T @ v[1][:3, 3]) for v in views]).double().cpu()
    radius = float((centres - centres.mean(0)).norm(dim=1).max()) if len(views) > 1 else 0.0
    if radius < 1e-9:
        pts = means.detach().double().cpu()
        radius = float((pts.max(0).values - pts.min(0).values).norm()) / 2 if len(pts) else 1.0
    return 1.1 * max(radius, 1e-9)


def optimise(
    params: Params,
    views: list[View],
    rasterize: Rasterize,
    config: OptimiseConfig,
    device: str = "cpu",
    should_stop: StopCheck = never_stop,
    progress: Progress = no_progress,
) -> tuple[Params, list[float]]:
    """Train `params` against `views`, one view per step in seeded shuffled epochs.

    Returns the trained parameters (CPU, detached) and the loss of every step. The inputs are
    not modified. Means' learning rate decays exponentially to 1/100 over the run, as in 3DGS.
    """
    import torch

    if not views:
        raise ScandropError(ErrorCode.invalid_settings, "There are no views to train the splats against.")
    p = params.trainable(device)
    views = [tuple(t.to(device) for t in v) for v in views]  # type: ignore[misc]
    lr_means = config.lr_means * scene_extent(p.means, views)
    groups = [
        (p.means, lr_means),
        (p.log_scales, config.lr_scales),
        (p.quats, config.lr_quats),
        (p.opacity_logits, config.lr_opacity),
        (p.colour_logits, config.lr_colours),
    ]
    opt = torch.optim.Adam([{"params": [t], "lr": lr} for t, lr in groups], eps=1e-15)
    decay = 0.01 ** (1 / max(config.iterations - 1, 1))
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    for it in range(config.iterations):
        check_stop(should_stop)
        if not order:
            order = torch.randperm(len(views), generator=gen).tolist()
        image, viewmat, K = views[order.pop()]
        height, width = image.shape[:2]
        render = rasterize(*p.activated(), viewmat, K, width, height)
        loss = photometric_loss(render, image, config.ssim_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt.param_groups[0]["lr"] = lr_means * decay ** (it + 1)
        losses.append(float(loss.detach()))
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            progress(
                (it + 1) / config.iterations, f"Step {it + 1}/{config.iterations}, loss {losses[-1]:.4f}"
            )
    return p.detached(), losses


def load_views(ws: Workspace) -> list[View]:
    """Views from ws.depth_dir/*.npz: undistorted rgb at the depth-grid size, its K, and R, t."""
    import torch

    views: list[View] = []
    for path in sorted(ws.depth_dir.glob("*.npz")):
        with np.load(path) as d:
            rgb, K, R, t = d["rgb"], d["K"].copy(), d["R"], d["t"]
        K[:2, 2] += 0.5  # depth grids put pixel centres at integers, rasterisers at +0.5
        viewmat = np.eye(4)
        viewmat[:3, :3], viewmat[:3, 3] = R, np.asarray(t).reshape(3)
        views.append(
            (
                torch.from_numpy(rgb.astype(np.float32) / 255.0),
                torch.from_numpy(viewmat.astype(np.float32)),
                torch.from_numpy(np.asarray(K, dtype=np.float32)),
            )
        )
    return views


def run(
    config: OptimiseConfig, ws: Workspace, device: str, progress: Progress, should_stop: StopCheck
) -> OptimiseResult:
    """Optimise ws.splats in place against the depth stage's views with gsplat on a CUDA `device`."""
    t0 = time.perf_counter()
    if not device.startswith("cuda"):
        raise ScandropError(
            ErrorCode.device_unavailable,
            f"Training splats needs a CUDA GPU; this job runs on {device!r}.",
            "The splats stay as initialised from the dense points.",
        )
    try:
        import torch
    except ImportError as exc:
        raise ScandropError(
            ErrorCode.device_unavailable,
            "Training splats needs PyTorch, which is not installed.",
            "Install a CUDA build of torch and gsplat on a machine with an NVIDIA GPU.",
        ) from exc
    if not torch.cuda.is_available():
        raise ScandropError(ErrorCode.device_unavailable, "No CUDA GPU is visible to PyTorch.", "")
    if not ws.splats.exists():
        raise ScandropError(
            ErrorCode.dense_failed, "The initial splats are missing.", "Run make_splats first."
        )
    params = from_npz(ws.splats)
    views = load_views(ws)
    if not views:
        raise ScandropError(
            ErrorCode.dense_failed, "No undistorted views to train against.", "Run the depth stage first."
        )
    progress(0.0, f"Training {len(params.means)} splats against {len(views)} views")
    trained, losses = optimise(params, views, gsplat_rasterize, config, device, should_stop, progress)
    if not all(math.isfinite(x) for x in losses):
        raise ScandropError(
            ErrorCode.internal_error,
            "Splat training diverged (non-finite loss).",
            "Lower the learning rates; the initialised splats were kept.",
        )
    to_npz(trained, ws.splats)
    return OptimiseResult(
        splats=len(trained.means),
        views=len(views),
        iterations=len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=round(time.perf_counter() - t0, 3),
    )
