"""DISK features and LightGlue matches (kornia), for photos SIFT cannot connect.

torch and kornia are imported inside these functions only: the daemon and the SIFT-only path never
load them. The networks read their weights from files the model store verified (sha256), never from
kornia's own download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Features:
    """One photo's keypoints in the stored photo's pixels (x, y) and their 128-d descriptors."""

    keypoints: np.ndarray  # (N, 2) float32
    descriptors: np.ndarray  # (N, 128) float32
    size: tuple[int, int]  # (width, height) of the stored photo


@dataclass
class Networks:
    disk: Any
    lightglue: Any
    device: str


def available() -> bool:
    """Whether torch and kornia import here (the `learned` extra is installed)."""
    try:
        import kornia.feature  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def load(disk_weights: Path, lightglue_weights: Path, device: str, seed: int) -> Networks:
    """DISK (depth checkpoint) and LightGlue for DISK features, from verified local files."""
    import torch
    from kornia.feature import DISK, LightGlue

    torch.manual_seed(seed)
    disk = DISK()
    disk.load_state_dict(torch.load(disk_weights, map_location="cpu", weights_only=True)["extractor"])
    # features=None: no download; the DISK entry of kornia's table sets only input_dim (128).
    lightglue = LightGlue(None, input_dim=128)
    state = torch.load(lightglue_weights, map_location="cpu", weights_only=True)
    for i in range(lightglue.conf.n_layers):  # the released file uses LightGlue's first layer names
        state = {
            k.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.").replace(
                f"cross_attn.{i}.", f"transformers.{i}.cross_attn."
            ): v
            for k, v in state.items()
        }
    # strict=False as kornia loads it: the file also holds a constant `log_assignment.N.r` (1.0) that
    # kornia's module does not have; every learned parameter must be there.
    missing, _ = lightglue.load_state_dict(state, strict=False)
    learned_missing = [k for k in missing if k in dict(lightglue.named_parameters())]
    if learned_missing:
        raise ValueError(f"LightGlue weights do not fit this network: missing {learned_missing}")
    return Networks(disk.eval().to(device), lightglue.eval().to(device), device)


def extract(nets: Networks, photo: Path, max_size: int, num_keypoints: int) -> Features:
    """DISK on the photo scaled so its longer side is at most `max_size`; keypoints in full pixels."""
    import torch

    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    width, height = rgb.size
    scale = min(1.0, max_size / max(width, height))
    if scale < 1.0:
        rgb = rgb.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        (found,) = nets.disk(pixels.to(nets.device), n=num_keypoints, pad_if_not_divisible=True)
    xy = found.keypoints.cpu().numpy().astype(np.float64)
    # DISK's keypoints are pixel indices at the scaled size; COLMAP's pixel centres are at +0.5.
    keypoints = ((xy + 0.5) / scale).astype(np.float32)
    return Features(keypoints, found.descriptors.cpu().numpy().astype(np.float32), (width, height))


def match(nets: Networks, a: Features, b: Features) -> np.ndarray:
    """LightGlue matches between two photos' DISK features, as (M, 2) keypoint indices."""
    import torch

    def side(f: Features) -> dict[str, torch.Tensor]:
        return {
            "keypoints": torch.from_numpy(f.keypoints)[None].to(nets.device),
            "descriptors": torch.from_numpy(f.descriptors)[None].to(nets.device),
            "image_size": torch.tensor([f.size], dtype=torch.float32, device=nets.device),
        }

    with torch.inference_mode():
        out = nets.lightglue({"image0": side(a), "image1": side(b)})
    return out["matches"][0].cpu().numpy().astype(np.uint32).reshape(-1, 2)
