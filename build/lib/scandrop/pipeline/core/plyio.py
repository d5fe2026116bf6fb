"""Binary little-endian PLY, written and read with numpy structured arrays.

Every PLY scandrop writes (Poisson input, mesh.ply, points.ply, splats.ply) goes through
`write_ply`, and the meshes COLMAP writes back come through `read_ply`: one small, exact
implementation instead of several ad-hoc header writers. Only what those files use is
supported: scalar vertex properties and one face list property.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scandrop.pipeline.core.stage import atomic_path

# PLY type names <-> little-endian numpy dtypes.
_PLY_TO_NUMPY = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "<i2",
    "int16": "<i2",
    "ushort": "<u2",
    "uint16": "<u2",
    "int": "<i4",
    "int32": "<i4",
    "uint": "<u4",
    "uint32": "<u4",
    "float": "<f4",
    "float32": "<f4",
    "double": "<f8",
    "float64": "<f8",
}
_NUMPY_TO_PLY = {
    "i1": "char",
    "u1": "uchar",
    "i2": "short",
    "u2": "ushort",
    "i4": "int",
    "u4": "uint",
    "f4": "float",
    "f8": "double",
}


@dataclass(frozen=True)
class PlyData:
    vertex: np.ndarray  # structured array, one field per vertex property
    faces: np.ndarray  # (F, 3) int64 triangle indices; (0, 3) when the file has no faces


def _ply_type(dtype: np.dtype) -> str:
    key = dtype.str.lstrip("<>|=")
    if key not in _NUMPY_TO_PLY:
        raise ValueError(f"no PLY type for numpy dtype {dtype}")
    return _NUMPY_TO_PLY[key]


def write_ply(path: Path, vertex: np.ndarray, faces: np.ndarray | None = None, comment: str = "") -> None:
    """Write `vertex` (structured array) and optional triangles (F, 3) atomically to `path`."""
    vertex = vertex.astype(vertex.dtype.newbyteorder("<"), copy=False)
    lines = ["ply", "format binary_little_endian 1.0"]
    if comment:
        lines.append(f"comment {comment}")
    lines.append(f"element vertex {len(vertex)}")
    lines += [f"property {_ply_type(vertex.dtype[name])} {name}" for name in vertex.dtype.names or ()]
    face_bytes = b""
    if faces is not None:
        tri = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
        tri["n"] = 3
        tri["v"] = faces
        face_bytes = tri.tobytes()
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\n".join(lines) + "\n").encode("ascii"))
        fh.write(np.ascontiguousarray(vertex).tobytes())
        fh.write(face_bytes)


def read_ply(path: Path) -> PlyData:
    """Read a binary little-endian PLY with a vertex element and an optional triangle face list."""
    raw = path.read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path} is not a PLY file")
    body = raw.index(b"\n", end) + 1
    header = raw[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in [line.strip() for line in header]:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            elements.append((parts[1], int(parts[2]), []))
        elif parts[:1] == ["property"]:
            elements[-1][2].append(tuple(parts[1:]))
    vertex = np.zeros(0, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    faces = np.zeros((0, 3), dtype=np.int64)
    offset = body
    for name, count, props in elements:
        if props and props[0][0] == "list":
            _, count_type, index_type, _ = props[0]
            if len(props) != 1:
                raise ValueError(f"{path}: extra properties beside a list are not supported")
            dt = np.dtype([("n", _PLY_TO_NUMPY[count_type]), ("v", _PLY_TO_NUMPY[index_type], (3,))])
            data = np.frombuffer(raw, dtype=dt, count=count, offset=offset)
            if count and np.any(data["n"] != 3):
                raise ValueError(f"{path}: only triangle faces are supported")
        else:
            dt = np.dtype([(p[1], _PLY_TO_NUMPY[p[0]]) for p in props])
            data = np.frombuffer(raw, dtype=dt, count=count, offset=offset)
        offset += dt.itemsize * count
        if name == "vertex":
            vertex = data.copy()
        elif name == "face":
            faces = data["v"].astype(np.int64)
    return PlyData(vertex=vertex, faces=faces)


def xyz_of(vertex: np.ndarray) -> np.ndarray:
    """(N, 3) float positions of a PLY vertex array."""
    return np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)


def rgb_of(vertex: np.ndarray) -> np.ndarray | None:
    """(N, 3) uint8 colours of a PLY vertex array, or None when it has none."""
    names = vertex.dtype.names or ()
    if not all(c in names for c in ("red", "green", "blue")):
        return None
    return np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1).astype(np.uint8)


def vertex_array(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Build a PLY vertex array from named 1-D columns, in the order given."""
    n = len(next(iter(columns.values())))
    out = np.empty(n, dtype=[(name, col.dtype.newbyteorder("<").str) for name, col in columns.items()])
    for name, col in columns.items():
        out[name] = col
    return out


def points_vertex(xyz: np.ndarray, normals: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """x,y,z,nx,ny,nz (float32), red,green,blue (uint8): the layout of points.ply and Poisson input."""
    xyz = xyz.astype(np.float32)
    normals = normals.astype(np.float32)
    rgb = rgb.astype(np.uint8)
    return vertex_array(
        {
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "nx": normals[:, 0],
            "ny": normals[:, 1],
            "nz": normals[:, 2],
            "red": rgb[:, 0],
            "green": rgb[:, 1],
            "blue": rgb[:, 2],
        }
    )
