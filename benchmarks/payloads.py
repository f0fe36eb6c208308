"""The benchmark payloads: real Mcity data from MSIGHT_DATA_DIR when set, else from the sample
packaged in msight_fast/sample/; synthetic only when neither holds data."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from msight_fast import sample
from msight_fast.pcd import read_pcd, synthetic_sweep

DATA: Optional[Path] = sample.data_dir()

Payload = Union[np.ndarray, bytes]


def _jpeg() -> bytes:
    p = sample.image_file(DATA) if DATA is not None else None
    if p is not None:
        return p.read_bytes()
    rng = np.random.default_rng(1)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 364_255, dtype=np.uint8).tobytes() + b"\xff\xd9"


def _lidar() -> np.ndarray:
    p = sample.pcd_file(DATA) if DATA is not None else None
    return read_pcd(p) if p is not None else synthetic_sweep(38_690, seed=2)


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
