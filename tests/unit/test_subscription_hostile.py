"""A Subscription fed thousands of malformed messages through a real transport (the in-process
memory backend), interleaved with genuine frames: it never raises, delivers every genuine frame
intact and in order and nothing else, and counts exactly the messages its Reassembler rejects.

The malformed messages are raw bytes sent with ``Bus._send_bytes`` (the MSight drop-in's plain
mode): mutation-corpus frames (tests/fuzzing.py) that no codec accepts, the reproducers of
tests/unit/test_hostile_regressions.py, truncated frames, random bytes, empty messages and forged
fragments. Each forged fragment's fate follows from docs/wire-format.md section 2: a broken CRC,
length or geometry is rejected; a valid fragment of a frame that never completes is only pending
(not rejected); a duplicate is a duplicate; the last fragment of a forged frame whose bytes are
malformed completes it, and that frame is rejected then. Forged fragments all come from one
forged publisher, so the reassembler's per-publisher quota keeps them from ever crowding out a
genuine frame.
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

import msight_fast
from msight_fast import _schema as S

from ..fuzzing import Mutator, classify, implementations, pack_fragment
from .test_hostile_regressions import REPRODUCERS

FORGED_PUB = 0x0BAD_F00D_0BAD_F00D
MAX_MESSAGE = 64 << 10
MAX_FRAGMENT_COUNT = 65536               # docs/wire-format.md section 2: count <= 65536
Unit = List[Tuple[bytes, bool]]          # messages sent back to back, each with "must be rejected"


def _genuine(rng: np.random.Generator) -> List[Tuple[Any, Dict[str, Any]]]:
    lidar = np.dtype({"names": ["x", "y", "z", "intensity", "time", "column", "ring", "return_type"],
                      "formats": ["<f4"] * 5 + ["<u2", "u1", "u1"], "offsets": [0, 4, 8, 12, 16, 20, 22, 23],
                      "itemsize": 24})
    out: List[Tuple[Any, Dict[str, Any]]] = []
    for i in range(60):
        k = i % 5
        if k == 0:
            obj: Any = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)          # fragmented
        elif k == 1:
            obj = np.frombuffer(rng.bytes(24 * 500), dtype=lidar)
        elif k == 2:
            obj = b"\xff\xd8\xff\xe0" + rng.bytes(100_000) + b"\xff\xd9"            # fragmented
        elif k == 3:
            obj = rng.standard_normal((7, 3)).astype(">f8")
        else:
            obj = rng.bytes(int(rng.integers(0, 300)))
        fields: Dict[str, Any] = {"sensor_name": f"s{k}", "meta": {"i": i, "f": float(i) / 3, "s": f"#{i}"}}
        if isinstance(obj, bytes):
            fields["encoding"] = "jpeg" if k == 2 else "bytes"
        out.append((obj, fields))
    return out


def _fragments(rng: random.Random, data: bytes, chunk: int) -> List[bytes]:
    count = -(-len(data) // chunk)
    fid = rng.randrange(1 << 64)
    return [pack_fragment(fid, FORGED_PUB, i, count, len(data), i * chunk, chunk, data[i * chunk:(i + 1) * chunk])
            for i in range(count)]


def _forged_units(rng: random.Random, malformed_frames: List[bytes], max_frame_bytes: int) -> Dict[str, List[Unit]]:
    """Forged fragments by kind; every unit's messages go out back to back."""
    def frag(**kw: Any) -> bytes:
        chunk = kw.pop("chunk", rng.randbytes(rng.choice((1, 16, 100))))
        total = kw.pop("total", 3 * 100)
        chunk_size = kw.pop("chunk_size", 100)
        index = kw.pop("index", 0)
        count = kw.pop("count", -(-total // chunk_size) if chunk_size else 1)
        return pack_fragment(kw.pop("frame_id", rng.randrange(1 << 64)), FORGED_PUB, index, count, total,
                             kw.pop("offset", index * chunk_size), chunk_size, chunk, **kw)

    full = lambda: rng.randbytes(100)                                  # noqa: E731 - a full 100-byte chunk
    units: Dict[str, List[Unit]] = {
        "bad crc": [[(frag(chunk=full(), crc_ok=False), True)] for _ in range(40)],
        "chunk_len disagrees": [[(frag(chunk=full(), chunk_len=101), True)] for _ in range(40)],
        "shorter than its header": [[(frag(chunk=full())[:rng.randrange(4, 64)], True)] for _ in range(40)],
        "bad major": [[(b"\x93MSP\x02" + frag(chunk=full())[5:], True)] for _ in range(20)],
        "count is not ceil(total / chunk_size)": [[(frag(chunk=full(), count=rng.choice((0, 2, 4, 2**32 - 1))), True)]
                                                  for _ in range(40)],
        "total past max_frame_bytes": [[(frag(chunk=full(), total=max_frame_bytes + 1, chunk_size=2**32 - 1), True)]
                                       for _ in range(20)],
        "zero total or chunk size": [[(frag(chunk=b"", total=0, chunk_size=100, count=0), True)] for _ in range(10)]
        + [[(frag(chunk=b"", total=100, chunk_size=0, count=0), True)] for _ in range(10)],
        "index past count": [[(frag(chunk=full(), index=3, offset=300), True)] for _ in range(40)],
        "offset off the grid": [[(frag(chunk=full(), index=1, offset=101), True)] for _ in range(40)],
        "chunk shorter than the geometry says": [[(frag(chunk=rng.randbytes(99)), True)] for _ in range(40)],
        "more than 65536 fragments": [[(frag(chunk=b"x", total=MAX_FRAGMENT_COUNT + 1, chunk_size=1), True)]
                                      for _ in range(10)],
        "pending only (never completes)": [[(frag(chunk=full(), index=rng.randrange(3)), False)] for _ in range(40)],
    }
    dup = []
    for _ in range(20):
        m = frag(chunk=full(), index=1)
        dup.append([(m, False), (m, False)])
    units["duplicate of a pending fragment"] = dup
    # a forged frame put together in full: every fragment is pending, the last completes a frame
    # that does not decode, and that one is rejected
    complete = []
    for data in malformed_frames[:60]:
        if len(data) > 1:
            frags = _fragments(rng, data, rng.choice((max(1, len(data) // 3), max(1, len(data) - 1))))
            if len(frags) > 1:
                complete.append([(m, i == len(frags) - 1) for i, m in enumerate(frags)])
    units["complete, malformed frame"] = complete
    return units


def _malformed(rng: random.Random, genuine_enc: List[bytes], max_frame_bytes: int) -> Dict[str, List[Unit]]:
    impls = implementations()
    mut = Mutator()
    corpus: List[bytes] = []
    i = 0
    while len(corpus) < 1500:
        c = mut.frame_case(random.Random(7_000_000 + i))
        i += 1
        if c.buf[:4] == S.FRAG_MAGIC or len(c.buf) > MAX_MESSAGE - 128:     # room for a fragment header
            continue
        # refused by every codec, or escaping one (which must become a FrameError): an input a
        # codec accepts, even one that breaks an invariant, is left to the corpus test
        if all(o == "FrameError" or o.startswith("escape") for o in classify(c.buf, impls).outcomes.values()):
            corpus.append(c.buf)
    truncated = []
    for _ in range(300):
        e = rng.choice(genuine_enc)
        truncated.append(e[:rng.randrange(min(len(e), MAX_MESSAGE - 128))])
    noise = []
    for _ in range(300):
        b = rng.randbytes(rng.randrange(1, 400))
        noise.append(b if b[:1] != b"\x93" else b"\x00" + b[1:])      # no magic, no fragment header
    units: Dict[str, List[Unit]] = {
        "mutation corpus": [[(b, True)] for b in corpus],
        "truncated frame": [[(b, True)] for b in truncated],
        "random bytes": [[(b, True)] for b in noise],
        "empty": [[(b"", True)] for _ in range(10)],
        "known hostile input": [[(b, True)] for b, _ in REPRODUCERS.values()] * 3,
    }
    units.update(_forged_units(rng, truncated[:30] + corpus[:30], max_frame_bytes))
    return units


def _same_frame(f: Any, obj: Any, fields: Dict[str, Any]) -> bool:
    if isinstance(obj, np.ndarray):
        ok = (f.array is not None and f.array.dtype == obj.dtype and f.array.shape == obj.shape
              and f.array.tobytes() == obj.tobytes())
    else:
        ok = f.array is None and bytes(f.data) == obj and f.encoding == fields["encoding"]
    return ok and f.sensor_name == fields["sensor_name"] and f.meta == fields["meta"]


def test_hostile_messages_on_the_memory_backend_are_rejected_and_counted():
    rng = random.Random(20240602)
    name, topic = f"hostile-{uuid.uuid4().hex}", "hostile"
    with msight_fast.connect("memory", name=name, max_message_bytes=MAX_MESSAGE) as pub, \
            msight_fast.connect("memory", name=name, max_message_bytes=MAX_MESSAGE) as rx:
        sub = rx.subscribe(topic)
        genuine = _genuine(np.random.default_rng(3))
        genuine_enc = [msight_fast.encode(msight_fast.Frame.from_array(o, **f) if isinstance(o, np.ndarray)
                                          else msight_fast.Frame.from_bytes(o, **f)) for o, f in genuine]
        kinds = _malformed(rng, genuine_enc, rx.config.max_frame_bytes)
        units = [(kind, u) for kind, us in kinds.items() for u in us]
        rng.shuffle(units)
        every = max(1, len(units) // (len(genuine) - 1))
        fed = expect_rejected = 0
        g = 0
        for n, (_, unit) in enumerate(units):
            for msg, rejected in unit:
                pub._send_bytes(topic, msg)
                fed += 1
                expect_rejected += rejected
            if n % every == every - 1 and g < len(genuine) - 1:
                obj, fields = genuine[g]
                pub.publish(topic, obj, **fields)
                g += 1
        while g < len(genuine):                  # the last message is genuine: once it is in, all are
            obj, fields = genuine[g]
            pub.publish(topic, obj, **fields)
            g += 1
        assert fed >= 2000 and expect_rejected >= 1800

        got: List[Any] = []
        intruders: List[str] = []                # malformed messages delivered as frames
        guard = threading.Timer(300.0, sub.close)    # a lost genuine frame must fail, not hang
        guard.start()
        t0 = time.monotonic()
        try:
            for f in sub:
                if f.publisher_id != pub.publisher_id:
                    intruders.append(repr(f))
                    continue
                got.append(f)
                if len(got) == len(genuine):
                    break
        except Exception as e:                   # the iterator must never raise
            escapes = [m.hex()[:200] for us in kinds.values() for u in us for m, _ in u
                       if any(o.startswith("escape") for o in classify(m, implementations()).outcomes.values())]
            pytest.fail(f"the subscription's iterator raised {e!r} after {len(got)} genuine frames; "
                        f"messages that escape a codec: {escapes[:5]}")
        finally:
            guard.cancel()
        elapsed = time.monotonic() - t0
        assert not intruders, f"{len(intruders)} malformed messages were delivered as frames: {intruders[:5]}"
        assert len(got) == len(genuine), f"{len(got)} of {len(genuine)} genuine frames arrived in {elapsed:.0f} s"
        assert [f.seq for f in got] == list(range(1, len(genuine) + 1))
        bad = [i for i, (f, (obj, fields)) in enumerate(zip(got, genuine)) if not _same_frame(f, obj, fields)]
        assert not bad, f"genuine frames {bad} arrived altered"
        st = sub.stats()
        summary = {k: (len(us), sum(r for u in us for _, r in u)) for k, us in kinds.items()}
        assert st["rejected"] == expect_rejected, (
            f"rejected {st['rejected']}, expected {expect_rejected} of {fed} malformed messages; "
            f"(units, rejections) by kind: {summary}")
        assert st["received"] == len(genuine) and st["gaps"] == 0
        sub.close()
