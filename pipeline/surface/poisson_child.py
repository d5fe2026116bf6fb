"""The child interpreter that runs pycolmap's Poisson meshing for build_mesh.

Its own small module so that the child imports only pycolmap (0.35 s), not the mesh stage and
everything it imports (1.1 s before), for every job.
"""

from __future__ import annotations

import json
import sys

from scandrop.pipeline.core.child_process import die_with_parent


def main(parent: int) -> None:
    """argv = kind, input, output, options JSON."""
    die_with_parent(parent)
    import pycolmap

    kind, src, dst, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if kind == "poisson":
        pycolmap.poisson_meshing(src, dst, pycolmap.PoissonMeshingOptions(**options))
    else:
        raise ValueError(f"unknown child job {kind}")
