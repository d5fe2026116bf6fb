"""Device selection, probed in a throwaway process so the daemon never loads CUDA libraries."""

from __future__ import annotations

import pytest

from scandrop.models.device import resolve_device, resolve_device_in_child
from scandrop.pipeline.core.errors import ErrorCode, ScandropError


def test_child_probe_answers_like_the_in_process_one() -> None:
    assert resolve_device_in_child("cpu") == resolve_device("cpu")
    assert resolve_device_in_child("auto") == resolve_device("auto")


def test_child_probe_raises_the_same_error_for_an_impossible_request() -> None:
    if resolve_device("auto").name == "cuda":
        pytest.skip("this machine has CUDA: the request can be met")
    with pytest.raises(ScandropError) as err:
        resolve_device_in_child("cuda")
    assert err.value.code == ErrorCode.device_unavailable and err.value.hint
