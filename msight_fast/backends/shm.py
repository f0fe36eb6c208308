"""Same-host broadcast through POSIX shared memory: ``connect("shm")``. No broker, no daemon.

Files, under ``dir`` (``/dev/shm``), mode 0600:

- ``msf-<hash>.bell``: the topic's doorbell, one page. A futex word that every publisher of the
  topic bumps after each frame (readers sleep on it, so no one polls), a word bumped when a
  publisher's segment appears or closes (readers then list the directory again), and a table of
  the processes using the topic (the last one out removes the file).
- ``msf-<hash>-<publisher id>-<epoch>.seg``: one publisher's ring of ``slots`` slots for the topic.
  A header (owner pid and start time, geometry, the count of frames written), 64 reader rows, a
  table of slots (generation, message offset, length), a log of which slot holds which frame,
  and the slots. A slot is 64 KiB for the frame header, then the payload: the header is written
  so that it ends where the payload starts, and the message is one contiguous span.

Who writes what (the compiled core, msight_fast/_ext/_shm.pyx, does every access with atomics):

- The publisher, the only writer of the slots, takes the oldest slot that no reader holds. It
  marks it odd (being written), then looks for a reader holding the frame in it; a reader marks
  its hold, then checks the slot's generation. One of the two sees the other (Dekker's rule, with
  sequentially consistent atomics): either the publisher gives the slot back and takes another,
  or the reader counts the frame as lost. A reader never gets a slot while it is written, and a
  frame that it holds is never overwritten.
- A reader holds at most one slot: the frame ``recv`` returned last. ``frame.release()`` (or the
  next ``recv``) gives it back. A dead reader's row is freed by the publisher when the process is
  gone (pid and start time, so a reused pid does not count as alive).
- A publisher that dies mid-write leaves its slot odd and its log without the frame: no reader
  takes it. Its segment is removed by the next process that finds its owner dead.
- When every slot is held, ``full_policy`` says what a publish does: ``drop`` the new frame
  (counted in ``Bus.stats()["dropped"]``) or ``block`` until a reader gives one back, at most
  ``publish_timeout_s`` (then ``BackendUnavailable``).

Zero copy: ``Bus.loan(topic, shape, dtype)`` hands out an array inside a slot, and publishing it
writes only the frame header. A subscriber's ``frame.array`` is a read-only view into the slot.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import mmap
import os
import stat
import struct
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

from ..errors import BackendUnavailable, ConfigError, FrameTooLarge
from .base import Capabilities, Outgoing, Source, Start, Transport

_shm: Any
_IMPORT_ERROR: Optional[BaseException] = None
try:
    from .._ext import _shm
except ImportError as _e:                      # an install without compiled modules (a bare sdist, no compiler)
    _shm = None
    _IMPORT_ERROR = _e

log = logging.getLogger("msight_fast")

__all__ = ["ShmTransport", "ShmSource", "sweep", "topic_hash"]

PREFIX = "msf-"
MAINTAIN_S = 0.5          # how often a reader lists the directory and checks its publishers are alive
STALE_CREATE_S = 10.0     # a segment still without its magic after this was left by a crashed creator
GEN_MASK = (1 << 31) - 1  # segment generations are compared in 31 bits, wrapping
MIN_CAPACITY = 64 << 10
MAX_SLOT_BYTES = 1 << 34  # a header asking for more is not from this library (frames stop at 2^31 bytes here)


def topic_hash(topic: str) -> str:
    """The file-name form of a topic: topics may hold any character, file names may not."""
    return hashlib.sha1(topic.encode("utf-8")).hexdigest()[:20]


def _proc_stat(pid: int) -> Tuple[str, int]:
    """(state, start time in clock ticks since boot) of a process, ("", 0) if unknown. With the
    pid, the start time names one process where a pid alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rindex(b")") + 2:].split()
        return rest[0].decode("ascii", "replace"), int(rest[19])
    except (OSError, ValueError, IndexError):
        return "", 0


def _proc_start(pid: int) -> int:
    return _proc_stat(pid)[1]


_me: Tuple[int, int] = (0, 0)


def _self() -> Tuple[int, int]:
    """(pid, start time) of this process, computed again after a fork."""
    global _me
    pid = os.getpid()
    if _me[0] != pid:
        _me = (pid, _proc_start(pid))
    return _me


def _alive(pid: int, start: int) -> bool:
    """Whether the process that wrote (pid, start) into a file still runs. The values come from
    a file any process of this user could have written: out-of-range ones are a dead process."""
    if not 0 < pid <= 0x3FFFFFFF:             # above any pid_max Linux allows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                    # another user's process: it exists
        pass
    except (OverflowError, OSError):
        return False
    state, now = _proc_stat(pid)
    if state in ("Z", "X"):                    # killed, not yet reaped by its parent: it writes nothing more
        return False
    if start and now and now != start:         # the pid was reused
        return False
    return True


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:                            # gone already, or not ours to remove (a sticky /dev/shm)
        return False


def _open_own(path: str, flags: int) -> Optional[int]:
    """A descriptor of ``path`` if it is a regular file of this user that no one else may write or
    read (as this library makes them), else None. /dev/shm is writable by every local user: a FIFO
    there would hang an open, another user's file must be neither trusted nor removed."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def _read_own(path: str, n: int, offset: int = 0) -> Optional[bytes]:
    """Up to ``n`` bytes at ``offset`` of one of this user's files (see ``_open_own``), or None."""
    fd = _open_own(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        return os.pread(fd, n, offset)
    except OSError:
        return None
    finally:
        os.close(fd)


def _map(fd: int, size: int) -> mmap.mmap:
    """A shared mapping with its page tables filled now: a first write to each page of a 6 MB
    slot otherwise costs thousands of page faults (a few ms) on the publish that meets it."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags)


def _need_core() -> Any:
    if _shm is None:
        raise ConfigError(f"the shm backend needs msight_fast's compiled module _shm, which is not "
                          f"installed ({_IMPORT_ERROR}); install a wheel, or build with a C compiler")
    if not _shm.HAVE_FUTEX:
        raise ConfigError(f"the shm backend needs Linux futexes; this is {sys.platform}")
    return _shm


class _Bell:
    """The topic's doorbell file, mapped; this user's row in its table of users."""

    def __init__(self, directory: str, topic: str, reader: bool = False) -> None:
        shm = _need_core()
        self.reader = reader
        self.path = os.path.join(directory, f"{PREFIX}{topic_hash(topic)}.bell")
        self.topic = topic
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BackendUnavailable(f"shm: cannot open {self.path}: {e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise BackendUnavailable(f"shm: {self.path} is not a private file of this user (mode "
                                         f"{st.st_mode:o}, uid {st.st_uid}); remove it or use another MSIGHT_SHM_DIR")
            if st.st_size < shm.BELL_BYTES:
                # reserved, not sparse: a full tmpfs is an error here, not a SIGBUS at the first touch
                os.posix_fallocate(fd, 0, shm.BELL_BYTES)
            self.ino = st.st_ino
            self.mm = mmap.mmap(fd, shm.BELL_BYTES)
        except (OSError, ValueError) as e:
            raise BackendUnavailable(f"shm: cannot map {self.path}: {e}") from None
        finally:
            os.close(fd)
        m = self.map = shm.Mapping(self.mm)
        name = topic.encode("utf-8")[:shm.MAX_TOPIC]
        if m.ld64(0) != shm.BELL_MAGIC:
            # every writer writes the same bytes, so two first users racing here agree
            self.mm[shm.B_TOPIC:shm.B_TOPIC + len(name)] = name
            m.st32(shm.B_TOPIC_LEN, len(name))
            m.st64(0, shm.BELL_MAGIC)
        else:
            n = m.ld32(shm.B_TOPIC_LEN)
            if n > shm.MAX_TOPIC or bytes(self.mm[shm.B_TOPIC:shm.B_TOPIC + n]) != name:
                raise ConfigError(f"shm: {self.path} belongs to another topic (a hash collision, or a foreign file)")
        self.row = -1
        for attempt in range(2):
            if attempt:
                self._reap_users()
            if self._claim():
                break
        # no row: this user goes uncounted, and the file may be removed under it; it checks ``stale``

    def _claim(self) -> bool:
        shm, m = _shm, self.map
        pid, start = _self()
        for r in range(shm.MAX_USERS):
            off = shm.B_USERS + r * shm.USER_SIZE
            if m.ld32(off) == 0 and m.cas32(off, 0, pid):
                m.st64(off + 8, start)
                # a reader is owed segments that close from now on (see ``readers_behind``)
                m.st32(off + shm.U_SEEN, (1 << 31 | m.ld32(shm.B_PUBGEN) & GEN_MASK) if self.reader else 0)
                self.row = r
                return True
        return False

    def mark_seen(self, gen: int) -> None:
        """This reader has listed the directory at segment generation ``gen``: every segment
        closed up to then that it had frames to read from, it has joined."""
        if self.row >= 0 and self.reader:
            self.map.st32(_shm.B_USERS + self.row * _shm.USER_SIZE + _shm.U_SEEN, 1 << 31 | gen & GEN_MASK)

    def readers_behind(self, gen: int) -> bool:
        """A live reader of the topic has not listed the directory since generation ``gen``."""
        shm, m = _shm, self.map
        for r in range(shm.MAX_USERS):
            off = shm.B_USERS + r * shm.USER_SIZE
            pid = m.ld32(off)
            seen = m.ld32(off + shm.U_SEEN)
            if pid and seen >> 31 and 0 < (gen - seen) & GEN_MASK < 1 << 30 and _alive(pid, m.ld64(off + 8)):
                return True
        return False

    def _reap_users(self) -> int:
        shm, m = _shm, self.map
        live = 0
        for r in range(shm.MAX_USERS):
            off = shm.B_USERS + r * shm.USER_SIZE
            pid = m.ld32(off)
            if not pid:
                continue
            if _alive(pid, m.ld64(off + 8)):
                live += 1
            else:
                m.st64(off + 8, 0)
                m.st32(off + shm.U_SEEN, 0)
                m.cas32(off, pid, 0)
        return live

    def stale(self) -> bool:
        """The file at the path is not the one mapped (removed by a last user meanwhile)."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            return True

    def leave(self, directory: str, h: str) -> None:
        """Give up this user's row. Closed segments nobody needs now are removed; the last user out
        removes every closed or orphaned segment of the topic, then the doorbell (if no segment is left)."""
        if self.row >= 0:
            off = _shm.B_USERS + self.row * _shm.USER_SIZE
            if self.map.ld32(off) == _self()[0]:
                self.map.st64(off + 8, 0)      # start and seen before the pid: see Segment.free_row
                self.map.st32(off + _shm.U_SEEN, 0)
                self.map.cas32(off, _self()[0], 0)
            self.row = -1
        last = self._reap_users() == 0
        for n in _segment_names(directory, h):
            path = os.path.join(directory, n)
            if _unused(path, None if last else self):
                _unlink(path)
        if last and not _segment_names(directory, h) and not self.stale():
            _unlink(self.path)


def _segment_names(directory: str, h: str) -> List[str]:
    head = f"{PREFIX}{h}-"
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith(head) and n.endswith(".seg"))
    except OSError:
        return []


_HEAD = struct.Struct("<QIIIIQQIIQQQQQIIII")   # magic .. closed generation (offset 100): read without mapping


def _read_head(path: str) -> Optional[Dict[str, int]]:
    raw = _read_own(path, _HEAD.size)
    if raw is None:
        return None
    if len(raw) < _HEAD.size:
        return {"magic": 0, "pid": 0, "start": 0, "closed": 0, "closed_gen": 0}
    (magic, _ver, _slots, _log, _rows, _sb, _doff, pid, closed, start, pub, created, epoch, _wc, _rel, _waiting,
     _tl, closed_gen) = _HEAD.unpack(raw)
    return {"magic": magic, "pid": pid, "start": start, "closed": closed, "publisher": pub,
            "created": created, "epoch": epoch, "closed_gen": closed_gen}


def _unused(path: str, bell: Optional[_Bell]) -> bool:
    """A segment no one needs any more: closed or left by a dead publisher, with no live reader
    joined to it, and (closed) with every live reader of the topic past its closing (``bell``
    None: there are no readers left to wait for)."""
    head = _read_head(path)
    if head is None or head["magic"] != _shm.MAGIC:
        return False
    owner_dead = not _alive(head["pid"], head["start"])
    if not head["closed"] and not owner_dead:
        return False
    rows = _read_own(path, _shm.MAX_ROWS * _shm.ROW_SIZE, _shm.ROWS_OFF)
    if rows is None:
        return False
    for r in range(len(rows) // _shm.ROW_SIZE):
        pid, start = struct.unpack_from("<I4xQ", rows, r * _shm.ROW_SIZE)
        if pid and _alive(pid, start):
            return False
    if head["closed"] and bell is not None and bell.readers_behind(head["closed_gen"]):
        return False
    return True


def _expected_size(path: str) -> Optional[int]:
    """The file size a segment's header implies, or None if its geometry is out of range."""
    raw = _read_own(path, 40)
    if raw is None or len(raw) < 40:
        return None
    slots, slot_bytes = struct.unpack_from("<I", raw, 12)[0], struct.unpack_from("<Q", raw, 24)[0]
    shm = _shm
    if not 2 <= slots <= shm.MAX_SLOTS or slot_bytes < shm.HDR_AREA or slot_bytes % shm.PAGE \
            or slot_bytes > MAX_SLOT_BYTES:
        return None
    return int(shm.layout(slots, slot_bytes - shm.HDR_AREA)[3])


def sweep(directory: str = "/dev/shm") -> int:
    """Remove the segments of dead publishers and the doorbells nobody uses; returns how many
    files went. Every connect runs it; it is also safe to run by hand or from a cron job."""
    shm = _need_core()
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    segs = [n for n in names if n.startswith(PREFIX) and n.endswith(".seg")]
    live_hashes = set()
    for n in segs:
        path = os.path.join(directory, n)
        head = _read_head(path)
        if head is None:
            continue
        if head["magic"] != shm.MAGIC:
            try:
                young = time.time() - os.stat(path).st_mtime < STALE_CREATE_S
            except OSError:
                continue
            if young:                          # being created right now
                live_hashes.add(n[len(PREFIX):].split("-")[0])
                continue
        elif _alive(head["pid"], head["start"]):
            live_hashes.add(n[len(PREFIX):].split("-")[0])
            continue
        removed += _unlink(path)
    for n in names:
        if not (n.startswith(PREFIX) and n.endswith(".bell")):
            continue
        h = n[len(PREFIX):-len(".bell")]
        if h in live_hashes:
            continue
        path = os.path.join(directory, n)
        raw = _read_own(path, shm.BELL_BYTES)
        if raw is None:
            continue
        users = [struct.unpack_from("<IIQ", raw, shm.B_USERS + r * shm.USER_SIZE)
                 for r in range(shm.MAX_USERS) if len(raw) >= shm.B_USERS + (r + 1) * shm.USER_SIZE]
        if any(pid and _alive(pid, start) for pid, _, start in users):
            continue
        removed += _unlink(path)
    return removed


class _PubSegment:
    """A segment this process writes."""

    def __init__(self, seg: Any, path: str, epoch: int) -> None:
        self.seg = seg
        self.path = path
        self.epoch = epoch
        self.loans: Dict[int, Tuple[int, int, int]] = {}    # payload address -> (slot, bytes, loan id)
        self.view = memoryview(seg.mm)


_open: weakref.WeakSet[ShmTransport] = weakref.WeakSet()
_sources: weakref.WeakSet[ShmSource] = weakref.WeakSet()
FORKED = "an shm Bus does not survive fork(): connect again in the child"


def _after_fork_in_child() -> None:
    """A forked child must not act on its parent's segments: it would close them at exit (the
    parent's readers would then stop reading them) or write into them as a second writer. Its
    copies are put out of use without touching shared memory."""
    for t in list(_open):
        t._forked()
    for src in list(_sources):
        src._forked()
    _open.clear()
    _sources.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    """At interpreter exit, close what is still open: publishers' segments are removed, not left
    for the next sweep (a kill -9 or a crash still leaves them to it)."""
    for t in list(_open):
        try:
            t.close()
        except Exception:                      # exiting: nothing to report it to
            pass


class ShmTransport(Transport):
    name = "shm"
    CAPABILITIES = Capabilities(delivery="best_effort", groups=None, persistence=False, max_message=None)
    LENIENT = False

    def __init__(self, cfg: Any) -> None:
        _need_core()
        self.cfg = cfg
        self.capabilities = self.CAPABILITIES
        self.dir = cfg.dir
        if not os.path.isdir(self.dir):
            raise BackendUnavailable(f"shm: {self.dir} is not a directory (MSIGHT_SHM_DIR)")
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise BackendUnavailable(f"shm: {self.dir} is not writable by this user (MSIGHT_SHM_DIR)")
        from .. import _schema as S
        self._publisher_id = S.new_publisher_id()
        self._lock = threading.Lock()
        self._pubs: Dict[str, _PubSegment] = {}
        self._bells: Dict[str, _Bell] = {}
        self._epoch = 0
        self._abandoned: List[Tuple[str, int]] = []     # loans dropped, maybe unpublished: (topic, id)
        self._loan_ids = 0
        self._closed = False
        self._next_maintain = 0.0
        self.dropped = 0
        self.reaped = 0
        self.blocked = 0
        self.zero_copy = 0
        self._retired_overrun = 0
        self._retired: List[Tuple[str, _Bell]] = []     # closed segments not removed yet
        self._fork_lost = False
        sweep(self.dir)
        _open.add(self)

    # ------------------------------------------------------------ segments
    def _bell(self, topic: str) -> _Bell:
        b = self._bells.get(topic)
        if b is None:
            b = self._bells[topic] = _Bell(self.dir, topic)
        return b

    def _capacity(self, need: int) -> int:
        fixed = self.cfg.slot_bytes
        if fixed:
            if need > fixed:
                raise FrameTooLarge(f"a payload of {need} bytes exceeds the shm slot size {fixed} "
                                    "(MSIGHT_SHM_SLOT_BYTES; 0 sizes slots to the frames)")
            return int(fixed)
        if need <= 1 << 20:                    # small frames: a power of two, so sizes that vary a little fit
            cap = MIN_CAPACITY
            while cap < need:
                cap <<= 1
            return cap
        return need + need // 4                # a quarter to spare for frames that grow (JPEG sizes vary)

    def _segment(self, topic: str, payload: int) -> _PubSegment:
        """This publisher's segment for ``topic``, with slots for ``payload`` bytes (a bigger one
        replaces a smaller: readers drain the old one first)."""
        ps = self._pubs.get(topic)
        if ps is not None and payload <= ps.seg.slot_bytes - _shm.HDR_AREA:
            return ps
        shm = _shm
        bell = self._bell(topic)
        cap = self._capacity(payload)
        log_len, data_off, slot_bytes, size = shm.layout(self.cfg.slots, cap)
        self._epoch += 1
        path = os.path.join(self.dir, f"{PREFIX}{topic_hash(topic)}-{self._publisher_id:016x}-{self._epoch:06d}.seg")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise BackendUnavailable(f"shm: cannot create {path}: {e}") from None
        try:
            try:
                # reserve every page now: a full tmpfs is an error here, not a SIGBUS on a later write
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                _unlink(path)
                raise BackendUnavailable(f"shm: cannot reserve {size} bytes for {topic!r} in {self.dir} "
                                         f"({self.cfg.slots} slots of {cap}): {e}") from None
            mm = _map(fd, size)
        finally:
            os.close(fd)
        m = shm.Mapping(mm)
        pid, start = _self()
        name = topic.encode("utf-8")[:shm.MAX_TOPIC]
        m.st32(shm.H_VERSION, shm.VERSION)
        m.st32(shm.H_SLOTS, self.cfg.slots)
        m.st32(shm.H_LOG_LEN, log_len)
        m.st32(shm.H_ROWS, shm.MAX_ROWS)
        m.st64(shm.H_SLOT_BYTES, slot_bytes)
        m.st64(shm.H_DATA_OFF, data_off)
        m.st32(shm.H_OWNER_PID, pid)
        m.st64(shm.H_OWNER_START, start)
        m.st64(shm.H_PUBLISHER, self._publisher_id)
        m.st64(shm.H_CREATED, time.monotonic_ns())   # CLOCK_MONOTONIC: one clock for every process, never stepped
        m.st64(shm.H_EPOCH, self._epoch)
        m.st32(shm.H_TOPIC_LEN, len(name))
        mm[shm.H_TOPIC:shm.H_TOPIC + len(name)] = name
        m.st64(shm.H_MAGIC, shm.MAGIC)
        del m
        seg = shm.Segment(mm, bell.map)
        new = _PubSegment(seg, path, self._epoch)
        if ps is not None:
            self._retire(ps, bell)
        self._pubs[topic] = new
        bell.map.add32(shm.B_PUBGEN, 1)
        seg.ring()                             # readers asleep on the bell look for the new segment
        return new

    def _retire(self, ps: _PubSegment, bell: _Bell) -> None:
        """Close a segment. It is removed once every reader of the topic has listed the directory
        since (so a reader that had not found it yet still reads it out) and none is still joined;
        until then this publisher, its readers, or the last user out removes it."""
        self._retired_overrun += ps.seg.overrun
        gen = bell.map.add32(_shm.B_PUBGEN, 1) & GEN_MASK       # the bell readers use now, not the segment's
        ps.seg.st32(_shm.H_CLOSED_GEN, gen)
        ps.seg.st32(_shm.H_CLOSED, 1)
        bell.map.add32(_shm.B_COUNTER, 1)
        bell.map.futex_wake(_shm.B_COUNTER)
        ps.loans.clear()
        if _unused(ps.path, bell):
            _unlink(ps.path)
        else:
            self._retired.append((ps.path, bell))

    def _reap_readers(self, seg: Any, rows: List[int]) -> int:
        n = 0
        for r in set(rows):
            pid, start = seg.row_owner(r)
            if pid and not _alive(pid, start) and seg.reap_row(r, pid):
                n += 1
        self.reaped += n
        return n

    def _maintain(self) -> None:
        now = time.monotonic()
        if now < self._next_maintain:
            return
        self._next_maintain = now + MAINTAIN_S
        for topic, b in list(self._bells.items()):
            if b.stale():                      # a last user removed it meanwhile: use the one readers find
                self._bells[topic] = _Bell(self.dir, topic)
                ps = self._pubs.pop(topic, None)
                if ps is not None:
                    self._retire(ps, self._bells[topic])   # the next frame makes a segment tied to the new bell
                b.leave(self.dir, topic_hash(topic))
        for ps in self._pubs.values():
            self._reap_readers(ps.seg, [r for r in range(_shm.MAX_ROWS) if ps.seg.row_owner(r)[0]])
        still = []
        for path, bell in self._retired:
            if os.path.exists(path) and not (_unused(path, bell) and _unlink(path)):
                still.append((path, bell))
        self._retired = still

    def _acquire(self, ps: _PubSegment, deadline: float, what: str) -> int:
        """A slot, per ``full_policy`` when readers hold every one: -1 (drop) or wait (block)."""
        seg = ps.seg
        slot, holders = seg.acquire()
        if slot >= 0:
            return int(slot)
        if holders and self._reap_readers(seg, holders):
            slot, holders = seg.acquire()
            if slot >= 0:
                return int(slot)
        if self.cfg.full_policy == "drop":
            return -1
        self.blocked += 1
        seg.st32(_shm.H_PUB_WAITING, 1)
        try:
            while True:
                seen = seg.ld32(_shm.H_RELEASES)
                slot, holders = seg.acquire()
                if slot >= 0:
                    return int(slot)
                if self._reap_readers(seg, holders):
                    continue                   # a dead holder's slot is free now
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailable(f"shm: readers held every one of the {self.cfg.slots} slots of "
                                             f"{what} for publish_timeout_s (full_policy=block)")
                seg.futex_wait(_shm.H_RELEASES, seen, min(left, MAINTAIN_S))
        finally:
            seg.st32(_shm.H_PUB_WAITING, 0)

    # ------------------------------------------------------------ the contract
    def send(self, msg: Outgoing, deadline: float) -> None:
        parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in msg.parts] \
            if msg.fragments is None else list(msg.fragments)
        sizes = [len(p) for p in parts]
        total = sum(sizes)
        with self._lock:
            if self._closed:
                raise BackendUnavailable(FORKED if self._fork_lost else "shm: the transport is closed")
            self._collect_abandoned()
            self._maintain()
            ps = self._pubs.get(msg.topic)
            if ps is not None and ps.loans and len(parts) == 2:
                loan = ps.loans.get(_shm.address(parts[1]))
                if loan is not None and sizes[1] <= loan[1] and sizes[0] <= _shm.HDR_AREA:
                    slot = loan[0]
                    del ps.loans[_shm.address(parts[1])]
                    off = _shm.HDR_AREA - sizes[0]
                    ps.seg.write(ps.seg.slot_data(slot) + off, parts[0])
                    ps.seg.commit(slot, off, total)
                    self.zero_copy += 1
                    msg.zero_copy = True       # type: ignore[attr-defined]  # read by Bus.publish
                    return
            head = sizes[0] if len(parts) >= 2 and sizes[0] <= _shm.HDR_AREA else 0
            ps = self._segment(msg.topic, total - head)
            off = _shm.HDR_AREA - head
            slot = self._acquire(ps, deadline, repr(msg.topic))
            if slot < 0:
                self.dropped += 1
                return
            try:
                base = ps.seg.slot_data(slot) + off
                for p, n in zip(parts, sizes):
                    ps.seg.write(base, p)
                    base += n
                ps.seg.commit(slot, off, total)
            except BaseException:              # an interrupt mid-copy must not leave the slot odd for good
                ps.seg.abandon(slot)
                raise

    def loan(self, topic: str, nbytes: int, deadline: float) -> Tuple[memoryview, int]:
        """A writable span of ``nbytes`` in a free slot of ``topic``, the payload of the next frame
        published from it (Bus.loan wraps it in an array), and the loan's id for ``unloan``."""
        with self._lock:
            if self._closed:
                raise BackendUnavailable(FORKED if self._fork_lost else "shm: the transport is closed")
            self._collect_abandoned()
            ps = self._segment(topic, nbytes)
            if len(ps.loans) >= self.cfg.slots - 1:
                raise BackendUnavailable(f"shm: {len(ps.loans)} loans on {topic!r} are not published yet; "
                                         f"at most {self.cfg.slots - 1} (publish or drop them)")
            slot = self._acquire(ps, deadline, repr(topic))
            if slot < 0:
                raise BackendUnavailable(f"shm: readers hold every slot of {topic!r}; no slot to lend "
                                         "(full_policy=drop)")
            try:
                start = ps.seg.slot_data(slot) + _shm.HDR_AREA
                view = ps.view[start:start + nbytes]
                self._loan_ids += 1
                ps.loans[_shm.address(view) if nbytes else -self._loan_ids] = (slot, nbytes, self._loan_ids)
            except BaseException:
                ps.seg.abandon(slot)
                raise
            return view, self._loan_ids

    def unloan(self, topic: str, loan_id: int) -> None:
        """A loaned array was dropped (a finalizer, in any thread): if it was never published, its
        slot is freed at the next call. Never takes the lock: a finalizer may run under it."""
        self._abandoned.append((topic, loan_id))

    def _collect_abandoned(self) -> None:
        while self._abandoned:
            topic, loan_id = self._abandoned.pop()
            ps = self._pubs.get(topic)
            if ps is None:
                continue
            for addr, (slot, _, lid) in list(ps.loans.items()):
                if lid == loan_id:
                    del ps.loans[addr]
                    ps.seg.abandon(slot)

    def open(self, topic: str, group_id: Optional[str], from_beginning: bool,
             start: Optional[Start] = None) -> Source:
        if self._closed:
            raise BackendUnavailable(FORKED if self._fork_lost else "shm: the transport is closed")
        return ShmSource(self, topic)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._closed = self._fork_lost = True
        self._pubs, self._bells, self._retired, self._abandoned = {}, {}, [], []

    def stats(self) -> Dict[str, Any]:
        # no lock: a publish blocked on full slots (full_policy=block) holds it for up to publish_timeout_s
        overrun = self._retired_overrun + sum(ps.seg.overrun for ps in list(self._pubs.values()))
        return {"connected": True, "disconnects": 0, "reconnects": 0, "lost": self.dropped,
                "dropped": self.dropped, "overrun": overrun, "readers_reaped": self.reaped,
                "zero_copy": self.zero_copy, "blocked": self.blocked}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for topic, ps in self._pubs.items():
                self._retire(ps, self._bells[topic])
            self._pubs.clear()
            self._retired.clear()              # what is left, its readers or the last user out removes
            for topic, b in self._bells.items():
                b.leave(self.dir, topic_hash(topic))
            self._bells.clear()


class _ReadSegment:
    def __init__(self, seg: Any, path: str, row: int, publisher: int, epoch: int) -> None:
        self.seg = seg
        self.path = path
        self.row = row
        self.publisher = publisher
        self.epoch = epoch
        self.owner = (seg.ld32(_shm.H_OWNER_PID), seg.ld64(_shm.H_OWNER_START))
        self.dead = False


class ShmSource(Source):
    """A reader of every publisher's segment for one topic."""

    def __init__(self, t: ShmTransport, topic: str) -> None:
        self.t = t
        self.topic = topic
        self.dir = t.dir
        self.h = topic_hash(topic)
        self.bell = _Bell(self.dir, topic, reader=True)
        self._segs: Dict[str, _ReadSegment] = {}
        self._order: List[List[_ReadSegment]] = []      # per publisher, oldest epoch first
        self._rr = 0
        self._since = time.monotonic_ns()
        self._held: Any = None
        self._closed = False
        self._lock = threading.Lock()          # next() holds it but while asleep; close() waits for it
        self._pubgen = -1
        self._next_maintain = 0.0
        self._zero_copy = bool(t.cfg.zero_copy)
        self.dropped = 0
        self._refused: Set[str] = set()        # segments this reader gave up on for good (malformed)
        self._full: Set[str] = set()           # segments with no free reader row, at the last look
        _sources.add(self)
        self._done: Set[str] = set()           # segments read out and left: never joined again
        self.refused = 0                       # segments this reader could not join (every row taken, or bad)
        self._scan()

    def _scan(self) -> None:
        shm = _shm
        self._pubgen = self.bell.map.ld32(shm.B_PUBGEN)
        pid, start = _self()
        names = _segment_names(self.dir, self.h)
        present = {os.path.join(self.dir, n) for n in names}
        self._done &= present                  # forget what is gone, so the sets stay small
        self._refused &= present
        self._full &= present
        for n in names:
            path = os.path.join(self.dir, n)
            if path in self._segs or path in self._done:
                continue
            if path in self._refused:
                continue
            head = _read_head(path)
            if head is None or head["magic"] != shm.MAGIC:
                continue                       # being created, or not a segment: looked at again later
            fd = _open_own(path, os.O_RDWR)
            if fd is None:
                continue                       # gone meanwhile, or not this user's
            try:
                size = os.fstat(fd).st_size
                expect = _expected_size(path)
                if expect is None or size != expect:
                    self._refuse(path, f"{size} bytes where its header says {expect}")
                    continue
                # no MAP_POPULATE here: a reader touches only the slots it reads, once each
                mm = mmap.mmap(fd, size)
            except (OSError, ValueError):
                continue
            finally:
                os.close(fd)
            try:
                seg = shm.Segment(mm, self.bell.map)
            except ValueError as e:
                self._refuse(path, str(e))
                continue
            tl = seg.ld32(shm.H_TOPIC_LEN)
            mine = self.topic.encode("utf-8")[:shm.MAX_TOPIC]
            if tl > shm.MAX_TOPIC or bytes(mm[shm.H_TOPIC:shm.H_TOPIC + tl]) != mine:
                continue
            owner = (seg.ld32(shm.H_OWNER_PID), seg.ld64(shm.H_OWNER_START))
            if not _alive(*owner):
                _unlink(path)                  # a dead publisher's: nothing more will come
                continue
            # a segment made after this subscription is read from its first frame; an older one from now on
            first = 0 if seg.ld64(shm.H_CREATED) >= self._since else seg.ld64(shm.H_WRITE_COUNT)
            row = seg.claim_row(pid, start, first)
            if row < 0:                        # tried again at the next look: readers come and go
                if path not in self._full:
                    self._full.add(path)
                    self.refused += 1
                    log.warning("msight_fast: shm: %r cannot join %s yet: all %d reader rows are taken",
                                self.topic, n, shm.MAX_ROWS)
                continue
            self._full.discard(path)
            self._segs[path] = _ReadSegment(seg, path, row, seg.ld64(shm.H_PUBLISHER), seg.ld64(shm.H_EPOCH))
        self._reorder()
        self.bell.mark_seen(self._pubgen)
        for path in list(self._done):          # read out before this look: removable now that it is past
            if _unused(path, self.bell):
                _unlink(path)
                self._done.discard(path)

    def _refuse(self, path: str, why: str) -> None:
        """A segment this reader cannot use: counted and logged once, not tried again."""
        self._refused.add(path)
        self.refused += 1
        log.warning("msight_fast: shm: %r cannot read %s: %s", self.topic, os.path.basename(path), why)

    def _reorder(self) -> None:
        by_pub: Dict[int, List[_ReadSegment]] = {}
        for rs in self._segs.values():
            by_pub.setdefault(rs.publisher, []).append(rs)
        self._order = [sorted(v, key=lambda r: r.epoch) for _, v in sorted(by_pub.items())]

    def _detach(self, rs: _ReadSegment) -> None:
        rs.seg.free_row(rs.row, _self()[0])
        self._segs.pop(rs.path, None)
        self._done.add(rs.path)
        if _unused(rs.path, self.bell):
            _unlink(rs.path)
        self._reorder()

    def _poll(self) -> Optional[Any]:
        order = self._order
        n = len(order)
        for i in range(n):
            group = order[(self._rr + i) % n]
            rs = group[0]
            lease, skipped = rs.seg.take(rs.row)
            if skipped:
                self.dropped += skipped
            if lease is not None:
                self._rr = (self._rr + i + 1) % n
                if not self._zero_copy:        # frames kept past the next recv: a copy, and the slot goes back
                    data = bytes(lease)
                    lease._msf_release()
                    return data
                self._held = lease
                return lease
            if rs.dead or rs.seg.ld32(_shm.H_CLOSED):
                if rs.seg.pending(rs.row) == 0:
                    self._detach(rs)           # drained: the next epoch of that publisher, if any, comes next
                    return self._poll()
        return None

    def _maintain(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_maintain:
            return
        self._next_maintain = now + MAINTAIN_S
        if self.bell.stale():
            old = self.bell
            self.bell = _Bell(self.dir, self.topic, reader=True)
            old.leave(self.dir, self.h)
        for rs in list(self._segs.values()):
            if not rs.dead and not _alive(*rs.owner):
                rs.dead = True                 # what it committed is still read; then it is removed
        self._scan()

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        shm = _shm
        lock = self._lock
        lock.acquire()
        try:
            if self._held is not None:         # the frame returned last is given back now
                self._held._msf_release()
                self._held = None
            while not self._closed:
                got = self._poll()
                if got is not None:
                    return got, None
                bell = self.bell.map
                if bell.ld32(shm.B_PUBGEN) != self._pubgen:
                    self._maintain(force=True)
                    if deadline is None or time.monotonic() < deadline:
                        continue
                    return None
                self._maintain()
                left = MAINTAIN_S if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                bell.add32(shm.B_WAITERS, 1)
                try:
                    seen = bell.ld32(shm.B_COUNTER)
                    got = self._poll()
                    if got is not None:
                        return got, None
                    lock.release()             # close() may run while this sleeps
                    try:
                        bell.futex_wait(shm.B_COUNTER, seen, min(left, MAINTAIN_S))
                    finally:
                        lock.acquire()
                finally:
                    bell.sub32(shm.B_WAITERS, 1)
            return None
        finally:
            lock.release()

    def stats(self) -> Dict[str, Any]:
        return {"dropped": self.dropped, "pending_bytes": 0, "segments": len(self._segs),
                "segments_refused": self.refused}

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._closed = True
        self._segs, self._order, self._held = {}, [], None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.bell.map.add32(_shm.B_COUNTER, 1)          # wake a recv blocked in another thread
        self.bell.map.futex_wake(_shm.B_COUNTER)
        with self._lock:                       # that recv lets go within one poll
            self._leave()

    def _leave(self) -> None:
        if self._held is not None:
            self._held._msf_release()
            self._held = None
        for rs in list(self._segs.values()):
            rs.seg.free_row(rs.row, _self()[0])
        self._segs.clear()
        self._order = []
        self.bell.leave(self.dir, self.h)
