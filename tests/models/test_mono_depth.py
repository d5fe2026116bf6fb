"""MonoDepth against tiny ONNX graphs whose output is computable in numpy (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from scandrop.models.mono_depth import IMAGENET_MEAN, IMAGENET_STD, PATCH, MonoDepth, network_size
from scandrop.pipeline.core.errors import ErrorCode, ScandropError


def _save(tmp_path: Path, name: str, nodes: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _channel_mean_model(tmp_path: Path, keepdims: int = 0) -> Path:
    """pixel_values [1,3,H,W] -> ReduceMean over channels: [1,H,W] (or [1,1,H,W] with keepdims)."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceMean", ["pixel_values", "axes"], ["predicted_depth"], keepdims=keepdims)
    graph_in = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, "height", "width"])
    out_shape = [1, 1, "height", "width"] if keepdims else [1, "height", "width"]
    graph_out = helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph([node], "channel_mean", [graph_in], [graph_out], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"mean{keepdims}.onnx"
    onnx.save(model, str(path))
    return path


def _photo(height: int, width: int) -> np.ndarray:
    """Smooth colour gradients plus a little detail, as uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 37.0)
    g = 128 + 100 * np.cos(y / 23.0)
    b = 60 + 150 * (x + y) / (height + width)
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8)


def _expected(rgb: np.ndarray) -> np.ndarray:
    """The channel mean of the normalised network input, resized back, computed independently."""
    h, w = network_size(*rgb.shape[:2])
    interp = cv2.INTER_AREA if h * w < rgb.shape[0] * rgb.shape[1] else cv2.INTER_CUBIC
    small = cv2.resize(rgb, (w, h), interpolation=interp).astype(np.float32) / 255.0
    mean = ((small - IMAGENET_MEAN) / IMAGENET_STD).mean(axis=2)
    return cv2.resize(mean, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize(("height", "width"), [(480, 640), (520, 779), (300, 200), (1000, 1000)])
def test_network_size_keeps_aspect_and_patch_multiples(height: int, width: int) -> None:
    h, w = network_size(height, width)
    assert h % PATCH == 0 and w % PATCH == 0
    assert max(h, w) == 518
    assert abs(h / w - height / width) < 2 * PATCH / 518


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize(("height", "width"), [(480, 640), (300, 200)])
def test_predict_is_channel_mean_of_normalised_input(
    tmp_path: Path, keepdims: int, height: int, width: int
) -> None:
    model = MonoDepth(_channel_mean_model(tmp_path, keepdims))
    rgb = _photo(height, width)
    pred = model.predict(rgb)
    assert pred.shape == (height, width) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, _expected(rgb), atol=1e-4)
    assert model.backend == "onnxruntime-cpu"
    rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(model.predict(rgba), pred, atol=1e-6)  # alpha is ignored


def test_input_size_is_configurable(tmp_path: Path) -> None:
    model = MonoDepth(_channel_mean_model(tmp_path), input_size=140)
    rgb = _photo(480, 640)
    h, w = network_size(480, 640, 140)
    assert (h, w) == (112, 140)
    pred = model.predict(rgb)
    assert pred.shape == (480, 640)


def test_wrong_signature_is_refused(tmp_path: Path) -> None:
    # Two-channel input: not an RGB depth network.
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    graph = helper.make_graph(
        [node],
        "two_channels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "h", "w"])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ScandropError) as err:
        MonoDepth(path)
    assert err.value.code == ErrorCode.model_missing
    assert "[1, 3, H, W]" in err.value.message and err.value.hint

    # Right input, but the output keeps three channels.
    ident = _save(
        tmp_path,
        "identity",
        [helper.make_node("Identity", ["pixel_values"], ["predicted_depth"])],
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    with pytest.raises(ScandropError) as err:
        MonoDepth(ident)
    assert err.value.code == ErrorCode.model_missing and "predicted_depth" in err.value.message


def test_missing_or_garbage_file_is_model_missing(tmp_path: Path) -> None:
    with pytest.raises(ScandropError) as err:
        MonoDepth(tmp_path / "absent.onnx")
    assert err.value.code == ErrorCode.model_missing
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ScandropError) as err:
        MonoDepth(junk)
    assert err.value.code == ErrorCode.model_missing and "junk.onnx" in err.value.message


def test_cuda_without_provider_is_device_unavailable(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ScandropError) as err:
        MonoDepth(_channel_mean_model(tmp_path), device="cuda")
    assert err.value.code == ErrorCode.device_unavailable and err.value.hint


def test_wrong_image_is_a_caller_bug(tmp_path: Path) -> None:
    model = MonoDepth(_channel_mean_model(tmp_path))
    with pytest.raises(ValueError, match="uint8"):
        model.predict(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.predict(np.zeros((32, 32, 3), np.float32))
