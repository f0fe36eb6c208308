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


def load_fragments(name):
    return [bytes.fromhex(chunk.replace("\n", ""))
            for chunk in (GOLDEN / f"{name}.hex").read_text().split("--\n") if chunk.strip()]


@pytest.mark.parametrize("name", ["image_bgr8_fragments", "image_bgr8_fragments_1_0"])
def test_golden_fragments_reassemble(name):
    # 1.1 fragments name their frame's header CRC at offset 56; those of 1.0 writers have 0 there
    frags = load_fragments(name)
    assert len(frags) > 1
    sending = int.from_bytes(load("image_bgr8")[12:16], "little")
    assert {(f[5], int.from_bytes(f[56:60], "little")) for f in frags} == \
        ({(1, sending)} if name == "image_bgr8_fragments" else {(0, 0)})
    r = Reassembler()
    out = [r.feed(x) for x in reversed(frags)]
    assert out[-1] is not None and bytes(out[-1].data) == bytes.fromhex(VECTORS["image_bgr8"]["payload_hex"])
    assert np.asarray(out[-1].array).shape == (4, 6, 3)
    assert r.stats()["completed"] == 1 and r.stats()["rejected"] == 0


def test_golden_fragments_are_made_bit_exactly(wire):
    # the fragment header, made by either codec, for the golden frame's fragments
    want = load_fragments("image_bgr8_fragments")
    raw = load("image_bgr8")
    sending = int.from_bytes(raw[12:16], "little")
    chunk = len(want[0]) - 64
    made = [wire.pack_fragment_header(VECTORS["image_bgr8"]["frame_id"], VECTORS["image_bgr8"]["publisher_id"], i,
                                      len(want), len(raw), i * chunk, chunk, raw[i * chunk:(i + 1) * chunk], sending)
            + raw[i * chunk:(i + 1) * chunk] for i in range(len(want))]
    assert made == want
