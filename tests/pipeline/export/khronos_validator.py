"""The Khronos glTF validator (tests/gltf_validator, npm, pinned) run on one file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

VALIDATOR = Path(__file__).resolve().parents[2] / "gltf_validator"


def validate(glb: Path) -> dict[str, Any]:
    """The validator's report of `glb`; asserts it ran and found no error; skips where it is absent."""
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("glTF validator unavailable: needs node and `npm ci` in tests/gltf_validator")
    proc = subprocess.run(
        [node, str(VALIDATOR / "validate.mjs"), str(glb)], capture_output=True, text=True, timeout=120
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["issues"]["numErrors"] == 0, report["issues"]
    return report
