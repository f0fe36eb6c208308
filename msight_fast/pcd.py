"""A small reader for PCD v0.7 point clouds (``ascii`` and ``binary`` data) into structured arrays."""
from __future__ import annotations

import os
from typing import Dict, List, Union

import numpy as np

from .errors import FrameError

_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("U", 1): "u1", ("U", 2): "<u2", ("U", 4): "<u4",
          ("U", 8): "<u8", ("I", 1): "i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8"}


def read_pcd(path: Union[str, os.PathLike[str], bytes]) -> np.ndarray:
    """Read a PCD file (or its bytes) into a structured array with one field per PCD field."""
    if isinstance(path, bytes):
        raw = path
    else:
        with open(path, "rb") as fh:
            raw = fh.read()
    header: Dict[str, List[str]] = {}
    pos = 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0:
            raise FrameError("PCD header has no DATA line")
        line = raw[pos:end].decode("ascii", "replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *vals = line.split()
        header[key.upper()] = vals
        if key.upper() == "DATA":
            break
    try:
        fields, sizes, types = header["FIELDS"], [int(s) for s in header["SIZE"]], header["TYPE"]
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
        points = int(header.get("POINTS", [0])[0]) or int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
        kind = header["DATA"][0].lower()
    except (KeyError, ValueError, IndexError) as e:
        raise FrameError(f"bad PCD header: {e}") from None
    descr = []
    for name, size, typ, count in zip(fields, sizes, types, counts):
        base = _TYPES.get((typ.upper(), size))
        if base is None:
            raise FrameError(f"unsupported PCD field {name}: TYPE {typ} SIZE {size}")
        descr.append((name, base) if count == 1 else (name, base, (count,)))
    dt = np.dtype(descr)
    if kind == "binary":
        need = points * dt.itemsize
        if len(raw) - pos < need:
            raise FrameError(f"PCD data truncated: {len(raw) - pos} bytes, {need} expected")
        got: np.ndarray = np.frombuffer(raw, dtype=dt, count=points, offset=pos).copy()
        return got
    if kind == "ascii":
        table = np.loadtxt(raw[pos:].decode("ascii").splitlines(), ndmin=2)
        out = np.empty(len(table), dtype=dt)
        col = 0
        for name, count in zip(fields, counts):
            out[name] = table[:, col] if count == 1 else table[:, col:col + count]
            col += count
        return out
    raise FrameError(f"PCD DATA {kind!r} is not supported (binary and ascii are)")


LIDAR_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("time", "<f4"),
                        ("column", "<u2"), ("ring", "u1"), ("return_type", "u1")])


def synthetic_sweep(n: int = 262_144, seed: int = 0) -> np.ndarray:
    """A lidar sweep of ``n`` points in the dtype of the Mcity sample (24 bytes a point)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=LIDAR_DTYPE)
    az = np.linspace(0, 2 * np.pi, n, dtype=np.float32)
    r = rng.uniform(2, 80, n).astype(np.float32)
    out["x"], out["y"] = r * np.cos(az), r * np.sin(az)
    out["z"] = rng.normal(0, 1.5, n).astype(np.float32)
    out["intensity"] = rng.uniform(0, 255, n).astype(np.float32)
    out["time"] = np.linspace(0, 0.1, n, dtype=np.float32)
    out["ring"] = np.arange(n) % 128
    out["column"] = (np.arange(n) // 128) % 2048
    return out
