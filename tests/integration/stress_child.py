"""Child processes for the stress tests (run as ``python -m tests.integration.stress_child``)."""
import json
import os
import signal
import sys
import threading
import time

import msight_fast


def consume(backend, opts, topic, group, out_path, sleep_s, max_pending, seconds):
    """Receive frames, appending 'seq' lines to out_path (flushed per frame); print stats as JSON."""
    extra = {"max_pending_bytes": max_pending} if max_pending else {}
    bus = msight_fast.connect(backend, **opts, **extra)
    sub = bus.subscribe(topic, group_id=group or None)
    with open(out_path + ".ready", "w"):
        pass
    end = time.monotonic() + seconds
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())     # stop cleanly and report
    peak = 0
    with open(out_path, "a") as fh:
        while time.monotonic() < end and not stop.is_set():
            f = sub.recv(timeout=0.2)
            if f is None:
                continue
            fh.write(f"{f.seq}\n")
            fh.flush()
            if sleep_s:
                time.sleep(sleep_s)                     # a deliberately slow consumer
            peak = max(peak, _rss())
    st = sub.stats()
    st["peak_rss"] = peak
    print(json.dumps(st), flush=True)
    bus.close()


def _rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    backend, opts, topic, group, out_path, sleep_s, max_pending, seconds = sys.argv[1:]
    consume(backend, json.loads(opts), topic, group, out_path, float(sleep_s), int(max_pending), float(seconds))
