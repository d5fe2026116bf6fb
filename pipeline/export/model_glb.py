"""model.glb read back as a renderer needs it: the preview draws what the user gets, and the
appearance benchmark scores it from held-out viewpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh


@dataclass(frozen=True)
class ColouredModel:
    vertices: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    uv: np.ndarray | None  # (V, 2), glTF convention (0, 0) = the image's top-left corner
    texture: np.ndarray | None  # (H, W, 3) uint8
    vertex_rgb: np.ndarray | None  # (V, 3) uint8

    def moved(self, transform: Callable[[np.ndarray], np.ndarray]) -> ColouredModel:
        """The same model with its vertices mapped (e.g. into the ground truth's frame)."""
        return ColouredModel(transform(self.vertices), self.faces, self.uv, self.texture, self.vertex_rgb)


def load_model(glb: Path) -> ColouredModel:
    """A model.glb with its texture and UVs, or its vertex colours."""
    mesh = trimesh.load(glb, force="mesh", process=False)
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None:
        image = getattr(visual.material, "baseColorTexture", None)
        if image is not None:
            uv = np.asarray(visual.uv, dtype=np.float64).copy()
            uv[:, 1] = 1.0 - uv[:, 1]  # trimesh flips glTF's v to OpenGL's; flip back
            texture = np.asarray(image.convert("RGB"))
            return ColouredModel(vertices, faces, uv, texture, None)
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.uint8)
    return ColouredModel(vertices, faces, None, None, rgb)
