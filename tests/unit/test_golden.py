"""Golden vectors: decode the committed bytes and re-encode them bit-exactly, in both implementations."""
import json
from pathlib import Path

import numpy as np
import pytest

from msight_fast import Reassembler

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
VECTORS = json.loads((GOLDEN / "vectors.json").read_text())


def load(name):
    return bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", ""))


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_vector(wire, name):
    want = VECTORS[name]
    raw = load(name)
    f = wire.decode(raw)
    for key in ("sensor_name", "device_name", "encoding", "frame_id", "seq", "publisher_id",
                "capture_ts_ns", "creation_ts_ns", "publish_ts_ns", "meta"):
        assert getattr(f, key) == want[key], key
    assert bytes(f.data).hex() == want["payload_hex"]
    if want["dtype"] is None:
        assert f.array is None
    else:
        assert str(f.array.dtype.descr) == want["dtype"] and list(f.array.shape) == want["shape"]
    assert wire.encode(f, checksum=want["checksum"]) == raw
    assert b"".join(wire.encode_parts(f, checksum=want["checksum"])) == raw


def test_golden_fragments_reassemble():
    frags = [bytes.fromhex(chunk.replace("\n", ""))
             for chunk in (GOLDEN / "image_bgr8_fragments.hex").read_text().split("--\n") if chunk.strip()]
    assert len(frags) > 1
    r = Reassembler()
    out = [r.feed(x) for x in reversed(frags)]
    assert out[-1] is not None and bytes(out[-1].data) == bytes.fromhex(VECTORS["image_bgr8"]["payload_hex"])
    assert np.asarray(out[-1].array).shape == (4, 6, 3)
