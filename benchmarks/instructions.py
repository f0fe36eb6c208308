"""Instructions that one small Kafka frame costs msight_fast's own code, counted by valgrind's
callgrind: a count, unlike seconds, that another tenant of a shared machine does not move.

    python benchmarks/instructions.py [--what publish,recv] [--payload 1k]

- ``publish``: one ``Bus.publish`` on Kafka, small frames batched (the default). The broker is
  the embedded tansu, so topics and limits are real, but the producer is then a stub that takes
  each batch and drops it: librdkafka's own work, in its threads, is not counted.
- ``recv``: one ``Subscription.recv`` of a frame that a Kafka source decoded with the rest of its
  batch, as ``KafkaSource`` does (unpacked with ``batch_frames``, each frame ``decode``-d), from
  a stub source that hands pre-packed batches of 225 frames, through KafkaSource's cursor and,
  where the core is built, its compiled receive (``RecvLane``).

Each runs in a child under ``valgrind --tool=callgrind`` twice, with two numbers of calls; the
main thread's difference, over the difference in calls, is the count per call (start-up
cancels out). Needs valgrind (Debian's ``valgrind`` package).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, List, Optional, Tuple

BATCH = 225          # 1 KB frames in one 256 KiB batch (batch_max_bytes)
CALLS = (2250, 22500)


def _publish_child(n: int, payload: str) -> None:
    from msight_fast import connect
    from msight_fast.bench import make_payload, start_broker

    obj, enc, _ = make_payload(payload)
    broker = start_broker("kafka")
    bus = connect("kafka", **broker.options())
    bus.publish("instructions", obj, encoding=enc)     # the topic made and its limit known
    bus.flush(60)
    t: Any = bus._t

    class _Stub:
        def produce(self, *a: Any, **k: Any) -> None:
            pass

        def poll(self, *a: Any) -> int:
            return 0

        def flush(self, *a: Any) -> int:
            return 0

        def __len__(self) -> int:
            return 0

    t.producer = _Stub()
    t._linger_s = 1e6             # batches go out when full, not by the linger thread's clock
    publish = bus.publish
    for _ in range(n):
        publish("instructions", obj, encoding=enc)
    broker.stop()
    os._exit(0)                   # no Bus teardown: the stub has nothing to flush


def _recv_child(n: int, payload: str) -> None:
    from msight_fast import connect
    from msight_fast.backends.base import Source
    from msight_fast.bench import make_payload
    from msight_fast.codec import BatchCursor, Frame, RecvLane, batch_frames, decode, pack_batch, stamp_parts

    obj, enc, _ = make_payload(payload)
    batches: List[bytes] = []
    for j in range(max(CALLS) // BATCH + 1):         # the same set up, whatever n is
        frames = []
        for i in range(BATCH):
            f = Frame.from_bytes(obj, sensor_name="instructions", encoding=enc)
            frames.append(b"".join(bytes(x) for x in stamp_parts(f, j * BATCH + i + 1, 5, False)))
        batches.append(pack_batch([[x] for x in frames]))
    todo = iter(batches)

    class _Batches(Source):
        def __init__(self) -> None:
            self.cur = BatchCursor()              # as KafkaSource keeps its batch
            self._gen = self._local_gen = 0

        def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
            c = self.cur
            if c.i < len(c.frames):
                f = c.frames[c.i]
                c.i += 1
                return f, ("token" if c.i == len(c.frames) else None)
            c.frames = [decode(x) for x in batch_frames(next(todo))]
            c.i = 1
            return c.frames[0], None

        def recv_lane(self, sub: Any) -> Any:
            return None if RecvLane is None else RecvLane(sub, self, self.cur)

    bus = connect("memory", name=f"instructions-{os.getpid()}")
    sub = bus.subscribe("instructions")
    src = _Batches()
    sub._src = src
    sub._fast = src.recv_lane(sub)               # Kafka's compiled receive, as KafkaSource gives it
    recv = sub.recv
    for _ in range(n):
        recv(1.0)
    os._exit(0)


def _count(what: str, n: int, payload: str) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        # a fixed hash seed: with a random one, dict and set layouts moved the counts by about 3%
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--child", str(n), "--what", what, "--payload", payload],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        with open(out + "-01") as f:              # thread 1: the main thread
            for line in f:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="publish,recv")
    ap.add_argument("--payload", default="1k")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        (_publish_child if a.what == "publish" else _recv_child)(a.child, a.payload)
        return 0
    if shutil.which("valgrind") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    for what in a.what.split(","):
        lo, hi = (_count(what, n, a.payload) for n in CALLS)
        print(f"{what:8s} {a.payload}: {(hi - lo) / (CALLS[1] - CALLS[0]):,.0f} instructions per call "
              f"(main thread; {CALLS[0]:,} and {CALLS[1]:,} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
