"""A Subscription's hold on broker offsets (Kafka tokens) under hostile messages: a token is held
exactly until its frame is handed over or given up, never forever, and never released with
another frame; and no message, whatever its bytes, ends the stream."""
import struct
import time

import numpy as np

from msight_fast import Frame, codec, encode, fragment
from msight_fast import _schema as S
from msight_fast.bus import Subscription
from msight_fast.config import RedisConfig
from msight_fast.stats import LatencyWindow

from ..helpers import ScriptedSource, drain


def _sub(messages):
    src = ScriptedSource(messages)
    return Subscription(None, "t", src, RedisConfig(), None, whole_stream=True), src


def _frags(name, n, max_size, pub=7, frame_id=None):
    f = Frame.from_array(np.arange(n, dtype=np.uint8), sensor_name=name, frame_id=frame_id)
    f.publisher_id = pub
    return f, fragment(encode(f), max_size)


def _good(seq):
    f = Frame.from_bytes(b"ok", sensor_name="good", encoding="x")
    f.publisher_id, f.seq = 99, seq
    return encode(f)


def test_a_forged_publish_timestamp_does_not_end_the_stream():
    f = Frame.from_bytes(b"x", sensor_name="forged", encoding="x")
    f.publish_ts_ns = -(1 << 63)             # now - this does not fit in an int64
    sub, src = _sub([(encode(f), 1), (_good(1), 2)])
    assert [g.sensor_name for g in drain(sub)] == ["forged", "good"]
    assert src.released() == [1, 2]
    w = LatencyWindow()
    w.add(1 << 63)
    w.add(-(1 << 63) - 1)
    assert w.summary()["latency_p50_ns"] is None


def test_a_record_with_no_value_is_rejected_and_its_token_released():
    # confluent-kafka gives None for a record whose value is null (a tombstone)
    sub, src = _sub([(None, 1), (_good(1), 2)])
    assert [g.sensor_name for g in drain(sub)] == ["good"]
    assert sub.stats()["rejected"] == 1 and src.released() == [1, 2]


def test_the_tokens_of_a_frame_that_fails_to_decode_are_released():
    junk = bytes(range(256)) * 4             # not a frame: its fragments reassemble into garbage
    frags = fragment(junk, 600)
    sub, src = _sub([(m, i) for i, m in enumerate(frags)] + [(_good(1), 100)])
    assert [g.sensor_name for g in drain(sub)] == ["good"]
    assert sub.stats()["rejected"] == 1
    assert src.released() == list(range(len(frags))) + [100] and not sub._tokens


def test_the_tokens_of_a_frame_dropped_for_two_different_copies_of_a_fragment_are_released():
    f, frags = _frags("genuine", 3000, 1000)
    fid, pub, index, count, total, offset, chunk_size, sending, chunk = codec.impl.parse_fragment_header(frags[0])
    bad = bytes(b ^ 0xFF for b in bytes(chunk))
    forged = codec.impl.pack_fragment_header(fid, pub, index, count, total, offset, chunk_size, bad, sending) + bad
    msgs = [(frags[0], 0), (forged, 1)] + [(m, 2 + i) for i, m in enumerate(frags[1:])] + [(_good(1), 100)]
    sub, src = _sub(msgs)
    assert [g.sensor_name for g in drain(sub)] == ["good"]
    assert src.released() == [0, 1] + [2 + i for i in range(len(frags) - 1)] + [100]
    assert not sub._tokens


def test_a_forged_frame_sharing_the_ids_of_a_pending_one_does_not_release_its_tokens():
    g, gfr = _frags("genuine", 3000, 1000)                     # 4 fragments
    _, ffr = _frags("forged", 100, 150, frame_id=g.frame_id)   # same ids, another geometry
    msgs = [(gfr[0], "g0")] + [(m, f"f{i}") for i, m in enumerate(ffr)] \
        + [(m, f"g{i + 1}") for i, m in enumerate(gfr[1:])]
    sub, src = _sub(msgs)
    got = drain(sub)
    assert [x.sensor_name for x in got] == ["forged", "genuine"]
    assert src.log[0] == ("forged", [f"f{i}" for i in range(len(ffr))])     # not g0 with it
    assert src.log[1] == ("genuine", [f"g{i}" for i in range(len(gfr))])
    assert np.array_equal(got[1].array, g.array)


def test_a_duplicate_fragment_gives_its_token_back_at_once():
    f, frags = _frags("genuine", 3000, 1000)
    sub, src = _sub([(frags[0], 0), (frags[0], 1), (frags[1], 2)])
    assert drain(sub) == []
    assert src.log == [(None, [1])]                            # the copy's; the original is held
    assert sub._tokens == {codec.frame_key(frags[0]): [0, 2]}


def test_odd_buffers_are_frame_errors_in_the_reassembler():
    r = codec.Reassembler()
    for buf in (np.zeros((0, 5), np.uint8), np.array(7, np.uint8), np.zeros((2, 3), np.uint16)):
        try:
            r.feed(buf)
        except codec.FrameError:
            pass
        else:
            raise AssertionError(f"{buf!r} was accepted")
    assert r.rejected == 3


def test_a_fragment_passed_as_a_2d_array_is_still_a_fragment():
    f, frags = _frags("genuine", 3000, 1000)
    r = codec.Reassembler()
    out = [r.feed(np.frombuffer(m, np.uint8).reshape(len(m) // 4, 4) if len(m) % 4 == 0 else m) for m in frags]
    assert codec.is_fragment(np.frombuffer(frags[0], np.uint8).reshape(-1, 4)) == (len(frags[0]) % 4 == 0)
    assert np.array_equal(out[-1].array, f.array)


def test_frame_key_and_fragment_key_read_the_header():
    f, frags = _frags("genuine", 3000, 1000, pub=0xABCDEF)
    fid, pub, _, count, total, _, chunk_size, sending, _ = codec.impl.parse_fragment_header(frags[1])
    assert codec.fragment_key(frags[1]) == (pub, fid) == (0xABCDEF, f.frame_id)
    assert codec.frame_key(frags[1]) == (pub, fid, count, total, chunk_size, sending)
    assert sending == int.from_bytes(frags[0][64 + 12:64 + 16], "little") != 0    # the frame's header CRC
    assert struct.unpack_from("<I", frags[1], 28)[0] == count and len(frags[1]) >= S.FRAG_HEADER_LEN


def test_a_frame_the_backend_decoded_is_counted_and_its_token_released_like_bytes():
    # a batch's frames come from the backend decoded; they must be accounted as the same bytes would be
    def stamped(seq):
        f = codec.decode(_good(seq))
        f.publish_ts_ns = time.time_ns()
        return encode(f)
    msgs = [stamped(1), stamped(3), stamped(3)]
    sub_b, src_b = _sub([(m, i + 1) for i, m in enumerate(msgs)])
    sub_f, src_f = _sub([(codec.decode(m), i + 1) for i, m in enumerate(msgs)])
    got_b, got_f = drain(sub_b), drain(sub_f)
    assert [(g.seq, g.sensor_name) for g in got_f] == [(g.seq, g.sensor_name) for g in got_b] == \
        [(1, "good"), (3, "good"), (3, "good")]
    assert src_f.released() == src_b.released() == [1, 2, 3]
    keys = ("received", "bytes", "gaps", "duplicates", "publishers", "rejected")
    want = {k: sub_b.stats()[k] for k in keys}
    assert {k: sub_f.stats()[k] for k in keys} == want
    assert want["gaps"] == 1 and want["duplicates"] == 1 and want["received"] == 3
    assert sub_f.stats()["latency_p50_ns"] is not None and sub_b.stats()["latency_p50_ns"] is not None


def test_a_batch_token_that_comes_with_its_last_frame_is_released_only_with_it():
    # a backend may give a batch's token with its last frame only: nothing is released before
    batch = [codec.decode(_good(s)) for s in (1, 2, 3)]
    sub, src = _sub([(batch[0], None), (batch[1], None), (batch[2], "b1")])
    assert sub.recv(0).seq == 1 and sub.recv(0).seq == 2
    assert src.released() == []
    assert sub.recv(0).seq == 3
    assert src.released() == ["b1"] and src.log[-1] == ("good", ["b1"])
    assert sub.recv(0) is None


def test_a_decoded_frame_among_held_fragments_is_handed_and_the_fragments_kept():
    # the short path for decoded frames is not taken while fragments hold tokens: each token
    # still goes with its own frame
    f, frags = _frags("big", 300, 100)
    decoded = codec.decode(_good(1))
    msgs = [(frags[0], "f0"), (decoded, "d"), (frags[1], "f1")] + [(x, f"f{i}") for i, x in enumerate(frags[2:], 2)]
    sub, src = _sub(msgs)
    got = drain(sub)
    assert [g.sensor_name for g in got] == ["good", "big"]
    assert src.log == [("good", ["d"]), ("big", [f"f{i}" for i in range(len(frags))])]


class _ClosingSource(ScriptedSource):
    """Closes its subscription while the first message is on its way out of ``next``."""

    def __init__(self, messages):
        super().__init__(messages)
        self.sub = None
        self.calls = 0

    def next(self, timeout):
        self.calls += 1
        if self.sub is not None:
            self.sub._closed = True          # what close() from another thread does, mid-wait
        return super().next(timeout)


def test_a_message_taken_as_the_subscription_closes_is_still_handed():
    src = _ClosingSource([(_good(1), "t1")])
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    src.sub = sub
    f = sub.recv(0)
    assert f is not None and f.seq == 1 and src.released() == ["t1"]
    assert sub.recv(0) is None


def test_a_recv_that_times_out_asks_the_source_once():
    src = _ClosingSource([])
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    assert sub.recv(0) is None and src.calls == 1
    assert sub.recv(-5) is None and src.calls == 2       # a negative timeout is no wait, not an error
