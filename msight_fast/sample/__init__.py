"""Real Mcity sensor data shipped with the package: 8 frames of a roadside camera and one lidar
sweep (README.md in this folder says what they are; NOTICE credits them).

Another folder with the same layout can stand in (``msight-fast demo --data DIR``, or
``MSIGHT_DATA_DIR`` for the tests and benchmarks): camera frames in ``camera_seq/*.jpg`` (else
``*.jpg``), one still image ``sample_image.jpg`` (else the first frame), and a ``*.pcd`` sweep
(``sample_point_cloud.pcd`` first).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional

__all__ = ["DIR", "data_dir", "camera_files", "image_file", "pcd_file"]

DIR: Path = Path(__file__).resolve().parent


def camera_files(d: Path) -> List[Path]:
    """The camera frames in ``d``, in order: ``camera_seq/*.jpg``, else ``*.jpg``."""
    return sorted((d / "camera_seq").glob("*.jpg")) or sorted(d.glob("*.jpg"))


def image_file(d: Path) -> Optional[Path]:
    """One camera frame: ``sample_image.jpg`` when present, else the first of :func:`camera_files`."""
    p = d / "sample_image.jpg"
    if p.is_file():
        return p
    files = camera_files(d)
    return files[0] if files else None


def pcd_file(d: Path) -> Optional[Path]:
    """The lidar sweep: ``sample_point_cloud.pcd`` when present, else the first ``*.pcd``."""
    p = d / "sample_point_cloud.pcd"
    if p.is_file():
        return p
    pcds = sorted(d.glob("*.pcd"))
    return pcds[0] if pcds else None


def data_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """``MSIGHT_DATA_DIR`` when it holds camera frames, else this packaged sample; None when
    neither does (callers then synthesise frames of the same shapes)."""
    env = os.environ if environ is None else environ
    given = env.get("MSIGHT_DATA_DIR", "")
    for d in ([Path(given)] if given else []) + [DIR]:
        if d.is_dir() and image_file(d) is not None:
            return d
    return None
