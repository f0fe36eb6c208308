"""The backend-independent Subscription logic, driven by a scripted Source (no broker)."""
import numpy as np

from msight_fast import Frame, encode, fragment
from msight_fast.bus import Subscription
from msight_fast.config import RedisConfig

from ..helpers import ScriptedSource


def _frame(seq, n=300_000):
    f = Frame.from_array(np.full(n, seq % 256, np.uint8), sensor_name="cam")
    f.seq, f.publisher_id = seq, 7
    return encode(f)


def test_tokens_of_delivered_rejected_and_abandoned_messages_are_all_released():
    whole = _frame(1, 100)
    partial = fragment(_frame(2), 64 * 1024)[:2]         # never completes
    complete = fragment(_frame(3), 64 * 1024)
    msgs = [(whole, ("p", 0)), (b"\x93MSF garbage", ("p", 1))]
    msgs += [(m, ("p", 2 + i)) for i, m in enumerate(partial)]
    msgs += [(m, ("p", 10 + i)) for i, m in enumerate(complete)]
    src = ScriptedSource(msgs)
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    assert [sub.recv(0).seq for _ in range(2)] == [1, 3]
    assert sub.rejected == 1 and sub._reasm.pending == 1     # frame 2 still waits for its fragments
    held = [t for ts in sub._tokens.values() for t in ts]
    assert sorted(held) == [("p", 2), ("p", 3)]              # ...and holds its offsets back
    for p in sub._reasm._pending.values():
        p.deadline = 0                                       # frame 2 times out
    src.q.append((_frame(4, 100), ("p", 20)))
    assert sub.recv(0).seq == 4
    assert sub.stats()["fragments_expired"] == 1 and not sub._tokens
    # nothing is held back forever: every token was released, delivered or not
    assert sorted(src.handed_tokens, key=lambda t: t[1]) == [t for _, t in msgs] + [("p", 20)]


def test_stats_count_gaps_and_latency():
    src = ScriptedSource([(_frame(s, 10), None) for s in (1, 2, 5)])
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    assert [sub.recv(0).seq for _ in range(3)] == [1, 2, 5]
    st = sub.stats()
    assert st["received"] == 3 and st["gaps"] == 2 and st["bytes"] == 30
