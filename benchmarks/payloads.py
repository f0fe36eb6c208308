"""The benchmark payloads: real Mcity data when ../shared/data exists, synthetic otherwise."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

from msight_fast.pcd import read_pcd, synthetic_sweep

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MSIGHT_DATA_DIR", REPO.parent / "shared" / "data"))

Payload = Union[np.ndarray, bytes]


def _jpeg() -> bytes:
    p = DATA / "sample_image.jpg"
    if p.is_file():
        return p.read_bytes()
    rng = np.random.default_rng(1)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 364_255, dtype=np.uint8).tobytes() + b"\xff\xd9"


def _lidar() -> np.ndarray:
    p = DATA / "sample_point_cloud.pcd"
    return read_pcd(p) if p.is_file() else synthetic_sweep(38_690, seed=2)


def load(names=None) -> Dict[str, Tuple[Payload, str]]:
    """name -> (payload, encoding)."""
    rng = np.random.default_rng(0)
    makers = {
        "raw1080": lambda: (rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8), "bgr8"),
        "raw4k": lambda: (rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8), "bgr8"),
        "jpeg": lambda: (_jpeg(), "jpeg"),
        "lidar": lambda: (_lidar(), "pointcloud"),
        "lidar262k": lambda: (synthetic_sweep(262_144), "pointcloud"),
        "1k": lambda: (rng.integers(0, 256, 1024, dtype=np.uint8).tobytes(), "bytes"),
    }
    return {k: makers[k]() for k in (names or makers)}


def nbytes(p: Payload) -> int:
    return p.nbytes if isinstance(p, np.ndarray) else len(p)
