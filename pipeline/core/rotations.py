"""Rotation matrices to quaternions in numpy: splats and the live model need only this, and
scipy.spatial.transform costs half a second to import in every process that would use it."""

from __future__ import annotations

import numpy as np


def rotation_to_quat_wxyz(rot: np.ndarray) -> np.ndarray:
    """(N, 3, 3) proper rotations -> (N, 4) unit quaternions w, x, y, z with w >= 0."""
    m = rot
    t = np.trace(m, axis1=1, axis2=2)
    d0, d1, d2 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    s21, s02, s10 = m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]
    a01, a02, a12 = m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1]
    cand = np.stack(
        [
            np.stack([1 + t, s21, s02, s10], 1),
            np.stack([s21, 1 + 2 * d0 - t, a01, a02], 1),
            np.stack([s02, a01, 1 + 2 * d1 - t, a12], 1),
            np.stack([s10, a02, a12, 1 + 2 * d2 - t], 1),
        ],
        axis=1,
    )
    # Pick, per matrix, the numerically best of the four classic formulas (largest diagonal term).
    diag = np.stack([t, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    q = cand[np.arange(len(m)), np.argmax(diag, axis=1)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1
    return q
