"""The per-job workspace: the one place that names the files stages hand to each other.

Files are the contract between stages. A stage reads only what earlier stages wrote here and
writes its own outputs atomically, so an interrupted job can resume from the last finished stage.

    <root>/
      frames/            keyframes of a video drop, frame_<index>.jpg (frames; absent otherwise)
      frames.json        which frames were kept and why (frames)
      unpacked/          the files of a zip drop, extracted safely (ingest; absent for folder drops)
      images/            normalised 8-bit RGB copies of the usable input photos (ingest)
      masks/             <image name>.png, 255 = object, COLMAP's mask naming (ingest, from alpha)
      ingest.json        what ingest accepted and rejected
      database.db        COLMAP features and matches (sparse)
      sparse/            COLMAP binary model in the scandrop world frame, +y up (sparse)
      sparse.json        sparse stage result
      mvs/               COLMAP's undistorted images and PatchMatch maps (depth, CUDA backend only)
      depth/<image>.npz  per-view depth (camera z), normals and confidence (depth)
      fused.npz          fused dense point cloud: xyz, normals, rgb (fuse)
      mesh.ply           coloured triangle mesh, decimated (mesh)
      splats.npz         Gaussian splat parameters (splats)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def mvs_dir(self) -> Path:
        return self.root / "mvs"

    def fresh_depth_dir(self) -> Path:
        """depth/ emptied of earlier maps (a rerun must not mix them with the new ones)."""
        self.depth_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.depth_dir.glob("*.npz"):
            stale.unlink()
        return self.depth_dir

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def frames_json(self) -> Path:
        return self.root / "frames.json"

    @property
    def unpacked_dir(self) -> Path:
        return self.root / "unpacked"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def ingest_json(self) -> Path:
        return self.root / "ingest.json"

    @property
    def database(self) -> Path:
        return self.root / "database.db"

    @property
    def sparse_dir(self) -> Path:
        return self.root / "sparse"

    @property
    def sparse_json(self) -> Path:
        return self.root / "sparse.json"

    @property
    def depth_dir(self) -> Path:
        return self.root / "depth"

    @property
    def fused(self) -> Path:
        return self.root / "fused.npz"

    @property
    def mesh(self) -> Path:
        return self.root / "mesh.ply"

    @property
    def splats(self) -> Path:
        return self.root / "splats.npz"

    def mask_for(self, image_name: str) -> Path:
        return self.masks_dir / f"{image_name}.png"

    def create(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def clean_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
