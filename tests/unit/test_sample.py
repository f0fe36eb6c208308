"""The Mcity sample shipped inside the package (msight_fast/sample/) loads, stays small, carries
its notice, and is what the demo, the tests and the benchmarks fall back to."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from msight_fast import sample
from msight_fast.pcd import read_pcd


def test_the_packaged_sample_is_there_and_small():
    frames = sample.camera_files(sample.DIR)
    assert [p.name for p in frames] == [f"frame_{i:03d}.jpg" for i in range(8)]
    assert sample.pcd_file(sample.DIR) == sample.DIR / "sample_point_cloud.pcd"
    assert sample.image_file(sample.DIR) == frames[0]
    total = sum(p.stat().st_size for p in sample.DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total <= 2_000_000, total
    notice = (sample.DIR / "README.md").read_text(encoding="utf-8")
    assert "Mcity" in notice and "University of Michigan Transportation Research Institute (UMTRI)" in notice
    assert "BSD 3-Clause" in notice


def test_the_packaged_jpeg_frames_decode_to_camera_frames():
    Image = pytest.importorskip("PIL.Image", reason="pillow (the image extra) decodes the JPEGs")
    for p in sample.camera_files(sample.DIR):
        data = p.read_bytes()
        assert data[:3] == b"\xff\xd8\xff"
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert rgb.shape == (960, 1280, 3) and rgb.dtype == np.uint8
        assert rgb.std() > 10                     # a real picture, not a blank frame


def test_the_packaged_sweep_parses_to_38690_points():
    p = sample.pcd_file(sample.DIR)
    assert p is not None
    sweep = read_pcd(p)
    assert sweep.shape == (38_690,)
    assert sweep.dtype.names == ("x", "y", "z", "intensity", "time", "column", "ring", "return_type")
    assert sweep.dtype.itemsize == 24
    assert np.isfinite(sweep["x"]).all() and np.ptp(sweep["x"]) > 1.0


def test_data_dir_prefers_msight_data_dir_then_the_packaged_sample(tmp_path: Path):
    assert sample.data_dir({}) == sample.DIR
    assert sample.data_dir({"MSIGHT_DATA_DIR": ""}) == sample.DIR
    # a folder laid out like the sample: a still image is preferred over the sequence
    (tmp_path / "camera_seq").mkdir()
    (tmp_path / "camera_seq" / "frame_000.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    (tmp_path / "sample_image.jpg").write_bytes(b"\xff\xd8\xff\xe0\xff\xd9")
    (tmp_path / "sweep.pcd").write_bytes(b"")
    assert sample.data_dir({"MSIGHT_DATA_DIR": str(tmp_path)}) == tmp_path
    assert sample.image_file(tmp_path) == tmp_path / "sample_image.jpg"
    assert sample.camera_files(tmp_path) == [tmp_path / "camera_seq" / "frame_000.jpg"]
    assert sample.pcd_file(tmp_path) == tmp_path / "sweep.pcd"
    # a folder without camera frames falls back to the packaged sample
    assert sample.data_dir({"MSIGHT_DATA_DIR": str(tmp_path / "absent")}) == sample.DIR

