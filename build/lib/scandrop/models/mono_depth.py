"""Monocular relative depth (Depth Anything V2 style) through ONNX Runtime.

The network sees one RGB photo and returns relative inverse depth: larger = nearer, with an unknown
scale and shift per image. It is therefore never a metric depth by itself; callers align it to
geometry they trust (pipeline.dense.align_depth fits the scale and shift in inverse-depth space).

Expected model signature: one float32 input [1, 3, H, W] (H, W multiples of the patch size, 14),
ImageNet mean/std normalised RGB; one float32 output [1, H, W] or [1, 1, H, W].
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from scandrop.pipeline.core.errors import ErrorCode, ScandropError

PATCH = 14  # ViT-S/14 patch size: the network needs sides that are multiples of it
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def network_size(height: int, width: int, input_size: int = 518) -> tuple[int, int]:
    """(H, W) the network runs at: long side `input_size`, aspect kept, both multiples of PATCH."""
    scale = input_size / max(height, width)

    def snap(x: float) -> int:
        return max(PATCH, round(x / PATCH) * PATCH)

    return snap(height * scale), snap(width * scale)


def preprocess(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(1, 3, H, W) float32 network input: resized (area when shrinking, cubic when enlarging, as
    the reference implementation does), scaled to [0, 1], ImageNet-normalised."""
    h, w = size
    shrink = h * w < rgb.shape[0] * rgb.shape[1]
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    x = (resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _providers(device: str) -> list[str]:
    import onnxruntime

    if device == "cpu":
        return [_CPU]
    if device == "cuda":
        if _CUDA not in onnxruntime.get_available_providers():
            raise ScandropError(
                ErrorCode.device_unavailable,
                "The depth model was asked to run on CUDA, but this ONNX Runtime has no CUDA support.",
                "Install onnxruntime-gpu (with CUDA 12 and cuDNN 9), or run with --device cpu.",
            )
        return [_CUDA, _CPU]
    raise ScandropError(
        ErrorCode.invalid_settings,
        f"Unknown device {device!r} for the depth model.",
        "Use 'cpu' or 'cuda' (resolve 'auto' with models.device.resolve_device first).",
    )


def _bad_model(path: Path, what: str) -> ScandropError:
    return ScandropError(
        ErrorCode.model_missing,
        f"{path.name} is not a usable monocular depth model: {what}.",
        "Expected a Depth Anything V2 ONNX export (input pixel_values [1,3,H,W] -> predicted_depth"
        " [1,H,W]); delete the file so that it is downloaded again, or point to the right model.",
    )


def _fixed(dim: object, value: int) -> bool:
    """A dimension is acceptable when it is symbolic/unknown or exactly `value`."""
    return not isinstance(dim, int) or dim == value


class MonoDepth:
    """One loaded depth network; `predict` maps an RGB photo to relative inverse depth."""

    def __init__(
        self, model_path: Path, device: str = "cpu", input_size: int = 518, threads: int = 0
    ) -> None:
        """`input_size`: long side the network runs at (518 is the model's training size);
        `threads`: ONNX Runtime intra-op threads, 0 = its default (all cores)."""
        import onnxruntime  # lazy: only jobs that use a learned model pay for it

        model_path = Path(model_path)
        if input_size < PATCH:
            raise ScandropError(
                ErrorCode.invalid_settings,
                f"Depth model input size {input_size} is below one {PATCH}-pixel patch.",
                "Use the default 518.",
            )
        if not model_path.is_file():
            raise ScandropError(
                ErrorCode.model_missing,
                f"The monocular depth model {model_path} does not exist.",
                "Download it first (see README, 'Models'), or switch the monocular depth step off.",
            )
        providers = _providers(device)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: the CUDA provider is chatty about node placement
        try:
            self._session = onnxruntime.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            raise _bad_model(model_path, f"ONNX Runtime cannot load it ({str(exc)[:200]})") from exc
        if device == "cuda" and _CUDA not in self._session.get_providers():
            raise ScandropError(
                ErrorCode.device_unavailable,
                "ONNX Runtime could not start its CUDA provider for the depth model.",
                "Check the CUDA 12 / cuDNN 9 libraries that onnxruntime-gpu needs, or use --device cpu.",
            )
        self._device = device
        self.input_size = int(input_size)
        self._input, self._output, self._output_rank = self._check_signature(model_path)

    def _check_signature(self, path: Path) -> tuple[str, str, int]:
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise _bad_model(path, f"it has {len(inputs)} inputs, not 1")
        if not outputs:
            raise _bad_model(path, "it has no outputs")
        inp, out = inputs[0], outputs[0]
        shape = list(inp.shape)
        if (
            inp.type != "tensor(float)"
            or len(shape) != 4
            or not (_fixed(shape[0], 1) and _fixed(shape[1], 3))
        ):
            raise _bad_model(path, f"input {inp.name!r} is {inp.type} {shape}, not float [1, 3, H, W]")
        out_shape = list(out.shape)
        rank_ok = len(out_shape) == 3 or (len(out_shape) == 4 and _fixed(out_shape[1], 1))
        if out.type != "tensor(float)" or not rank_ok or not _fixed(out_shape[0], 1):
            raise _bad_model(
                path, f"output {out.name!r} is {out.type} {out_shape}, not float [1, H, W] or [1, 1, H, W]"
            )
        return inp.name, out.name, len(out_shape)

    @property
    def backend(self) -> str:
        """Which runtime and device run the network, for report.json."""
        return f"onnxruntime-{self._device}"

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB (an alpha channel is ignored) -> (H, W) float32 relative inverse depth
        at the photo's resolution; scale and shift are unknown (align before using it as depth)."""
        if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        rgb = rgb[..., :3]
        height, width = rgb.shape[:2]
        x = preprocess(rgb, network_size(height, width, self.input_size))
        try:
            (out,) = self._session.run([self._output], {self._input: x})
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise ScandropError(
                ErrorCode.internal_error,
                f"The depth model failed on a {x.shape[3]}x{x.shape[2]} input: {str(exc)[:200]}",
                "The model file may not match what scandrop expects: download it again, or use --device cpu.",
            ) from exc
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != self._output_rank or out.shape[0] != 1 or (out.ndim == 4 and out.shape[1] != 1):
            raise ScandropError(
                ErrorCode.internal_error,
                f"The depth model returned an array of shape {out.shape}, not [1, H, W].",
                "The model file does not match what scandrop expects: download it again.",
            )
        pred = out.reshape(out.shape[-2:])
        if not np.all(np.isfinite(pred)):
            raise ScandropError(
                ErrorCode.internal_error,
                "The depth model returned non-finite values.",
                "The model file may be damaged: download it again, or run on the CPU.",
            )
        return cv2.resize(pred, (width, height), interpolation=cv2.INTER_LINEAR)


def open_depth_model(name: str, models_dir: str | Path | None, device: str) -> MonoDepth:
    """The registry's model `name`, found offline in `models_dir` (default: SCANDROP_MODELS_DIR or
    the user's cache), checksum-verified, opened on `device`; model_missing names the pull command."""
    from scandrop.models.model_store import default_models_dir, model_path
    from scandrop.models.registry import get_spec

    return MonoDepth(
        model_path(get_spec(name), Path(models_dir) if models_dir else default_models_dir()), device
    )
