"""Regenerate the golden vectors (run only when the wire format deliberately changes).

    python tests/golden/make_golden.py

Writes <name>.hex (the frame, hex, 64 bytes a line) and vectors.json (what each decodes to).
Made with the pure-Python twin, the reference implementation. batch_three.hex is a batch container
(docs/wire-format.md 2a) of three of those frames; batch_three.json says where each one lies.
batch_shared.hex is a shared-header batch (2b) of one sensor's three frames, and
batch_shared.json holds each frame, whole, as hex: what a reader must rebuild.
"""
import json
from pathlib import Path

import numpy as np

from msight_fast import _pywire as W
from msight_fast.codec import batch_spans, fragment, pack_batch

HERE = Path(__file__).parent
LIDAR = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("time", "<f4"),
                  ("column", "<u2"), ("ring", "u1"), ("return_type", "u1")])


def fixed(f, seq):
    f.seq, f.publisher_id = seq, 0x0123456789ABCDEF
    f.capture_ts_ns, f.creation_ts_ns, f.publish_ts_ns = (1_764_000_000_000_000_000, 1_764_000_000_000_000_100,
                                                          1_764_000_000_000_000_200)
    return f


def cases():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    yield "image_bgr8", fixed(W.Frame.from_array(img, sensor_name="mcity_cam", device_name="edge-01", frame_id=1,
                                                 meta={"exposure_us": 1200, "gain": 1.5, "site": "mcity"}), 1), False
    yield "jpeg_crc", fixed(W.Frame.from_bytes(b"\xff\xd8\xff\xe0fakejpeg\xff\xd9", sensor_name="mcity_cam",
                                               encoding="jpeg", frame_id=2), 2), True
    pts = np.zeros(3, LIDAR)
    pts["x"], pts["ring"], pts["column"] = [1.5, -2.25, 3.0], [0, 1, 127], [7, 8, 2047]
    yield "lidar_struct", fixed(W.Frame.from_array(pts, sensor_name="lidar", frame_id=3), 3), False
    yield "bigendian_f8", fixed(W.Frame.from_array(np.array([[1.0, -2.5], [1e300, 0.0]], ">f8"),
                                                   sensor_name="s", frame_id=4), 4), False
    yield "zero_d", fixed(W.Frame.from_array(np.array(7, "<i4"), sensor_name="", frame_id=5), 5), False


def stream():
    """Three frames of one JPEG stream: a gap in seq, a capture time that steps back, a CRC each."""
    for k, (seq, payload, back) in enumerate([(41, b"\xff\xd8first\xff\xd9", 0), (42, b"\xff\xd8second!\xff\xd9", 0),
                                               (45, b"\xff\xd8\xff\xd9", 40_000_000)]):
        f = fixed(W.Frame.from_bytes(payload, sensor_name="mcity_cam", encoding="jpeg",
                                     frame_id=0xFEDCBA9876543210 + k), seq)
        step = 33_333_333 * k
        f.capture_ts_ns += step - back
        f.creation_ts_ns += step
        f.publish_ts_ns += step
        yield W.encode(f, checksum=True)


def hexlines(b: bytes) -> str:
    return "\n".join(b[i:i + 64].hex() for i in range(0, len(b), 64)) + "\n"


def main():
    manifest = {}
    encoded = {}
    for name, f, checksum in cases():
        enc = encoded[name] = W.encode(f, checksum=checksum)
        (HERE / f"{name}.hex").write_text(hexlines(enc))
        manifest[name] = {
            "sensor_name": f.sensor_name, "device_name": f.device_name, "encoding": f.encoding,
            "frame_id": f.frame_id, "seq": f.seq, "publisher_id": f.publisher_id,
            "capture_ts_ns": f.capture_ts_ns, "creation_ts_ns": f.creation_ts_ns,
            "publish_ts_ns": f.publish_ts_ns, "meta": f.meta, "checksum": checksum,
            "dtype": None if f.array is None else str(f.array.dtype.descr),
            "shape": None if f.array is None else list(f.array.shape),
            "payload_hex": bytes(f.data).hex(),
        }
    # image_bgr8_fragments_1_0.hex is kept as 1.0 writers made it (minor 0, no sending): not remade
    enc = W.encode(next(cases())[1])
    frags = fragment(enc, 200)
    (HERE / "image_bgr8_fragments.hex").write_text("".join(hexlines(x) + "--\n" for x in frags))
    (HERE / "vectors.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    names = ["image_bgr8", "jpeg_crc", "lidar_struct"]
    batch = pack_batch([[encoded[n]] for n in names])
    (HERE / "batch_three.hex").write_text(hexlines(batch))
    (HERE / "batch_three.json").write_text(json.dumps(
        {"frames": names, "spans": [list(s) for s in batch_spans(batch)], "total": len(batch)}, indent=1) + "\n")
    frames = list(stream())
    (HERE / "batch_shared.hex").write_text(hexlines(pack_batch([[f] for f in frames], shared=True)))
    (HERE / "batch_shared.json").write_text(json.dumps({"frames_hex": [f.hex() for f in frames]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
