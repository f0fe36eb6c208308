# cython: language_level=3
"""The shared-memory backend's hot path: a segment's atomics, slot hand-over and futex wake-ups.

One segment is one publisher's ring of slots for one topic, in a file under /dev/shm (see
msight_fast/backends/shm.py for the protocol, the layout and who writes which word). Everything
another process may read or write concurrently goes through ``_shm_sys.h``'s atomics; every offset
taken from the segment is checked against the mapping's size here, because another process wrote it.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE

cdef extern from "_shm_sys.h" nogil:
    uint64_t msf_ld64(const uint8_t* p)
    uint64_t msf_ld64_sc(const uint8_t* p)
    void msf_st64(uint8_t* p, uint64_t v)
    void msf_st64_sc(uint8_t* p, uint64_t v)
    uint32_t msf_ld32(const uint8_t* p)
    uint32_t msf_ld32_sc(const uint8_t* p)
    void msf_st32(uint8_t* p, uint32_t v)
    uint32_t msf_add32(uint8_t* p, uint32_t v)
    uint32_t msf_sub32(uint8_t* p, uint32_t v)
    int msf_cas32(uint8_t* p, uint32_t expected, uint32_t desired)
    int msf_cas64(uint8_t* p, uint64_t expected, uint64_t desired)
    void msf_fence()
    void msf_pause()
    int msf_futex_wait(uint8_t* p, uint32_t expected, double timeout_s)
    int msf_futex_wake(uint8_t* p, int n)
    void msf_copy(uint8_t* dst, const uint8_t* src, size_t n)
    int MSF_HAVE_FUTEX

HAVE_FUTEX = bool(MSF_HAVE_FUTEX)

cdef enum:
    # ---- the segment layout (docs in msight_fast/backends/shm.py); offsets in bytes
    C_VERSION = 1
    C_H_MAGIC = 0
    C_H_VERSION = 8
    C_H_SLOTS = 12
    C_H_LOG_LEN = 16
    C_H_ROWS = 20
    C_H_SLOT_BYTES = 24
    C_H_DATA_OFF = 32
    C_H_OWNER_PID = 40
    C_H_CLOSED = 44
    C_H_OWNER_START = 48
    C_H_PUBLISHER = 56
    C_H_CREATED = 64
    C_H_EPOCH = 72
    C_H_WRITE_COUNT = 80
    C_H_RELEASES = 88                     # futex: a reader gave a slot back (a blocked publisher waits on it)
    C_H_PUB_WAITING = 92
    C_H_TOPIC_LEN = 96
    C_H_CLOSED_GEN = 100                  # the topic's segment generation when this one closed (31 bits)
    C_H_TOPIC = 128
    C_MAX_TOPIC = 256
    C_ROWS_OFF = 512
    C_ROW_SIZE = 64
    C_R_PID = 0                           # 0: free; a reader claims its row by CAS 0 -> its pid
    C_R_START = 8
    C_R_HOLD = 16                         # (slot gen << 8) | (slot + 1) of the one slot the reader holds; 0: none
    C_R_NEXT = 24                         # the index of the next frame the reader wants
    C_MAX_ROWS = 64
    C_SLOTS_OFF = C_ROWS_OFF + C_MAX_ROWS * C_ROW_SIZE
    C_SLOT_SIZE = 32
    C_S_GEN = 0                           # 0: never written; odd: being written; 2n + 2: holds frame n
    C_S_OFF = 8
    C_S_LEN = 16
    C_MAX_SLOTS = 64
    C_HDR_AREA = 65536                    # each slot: the frame header ends here, the payload starts here
    C_PAGE = 4096
    # ---- the topic's doorbell (one small file per topic, shared by its publishers and readers)
    C_B_COUNTER = 8                       # futex: bumped after every frame published on the topic
    C_B_WAITERS = 12
    C_B_PUBGEN = 16                       # bumped when a segment appears or closes: readers look again
    C_B_TOPIC_LEN = 20
    C_B_TOPIC = 32
    C_B_USERS = 512
    C_USER_SIZE = 16
    C_U_SEEN = 4                          # a reader's: 1 << 31 | the segment generation it last looked at
    C_MAX_USERS = 64
    C_BELL_BYTES = C_PAGE
cdef uint64_t C_MAGIC = 0x313047455346534D          # b"MSFSEG01" little-endian; written last, so a reader never sees half a header
cdef uint64_t C_BELL_MAGIC = 0x314C4C454246534D     # b"MSFBELL1"

MAGIC = C_MAGIC
VERSION = C_VERSION
H_MAGIC = C_H_MAGIC
H_VERSION = C_H_VERSION
H_SLOTS = C_H_SLOTS
H_LOG_LEN = C_H_LOG_LEN
H_ROWS = C_H_ROWS
H_SLOT_BYTES = C_H_SLOT_BYTES
H_DATA_OFF = C_H_DATA_OFF
H_OWNER_PID = C_H_OWNER_PID
H_CLOSED = C_H_CLOSED
H_OWNER_START = C_H_OWNER_START
H_PUBLISHER = C_H_PUBLISHER
H_CREATED = C_H_CREATED
H_EPOCH = C_H_EPOCH
H_WRITE_COUNT = C_H_WRITE_COUNT
H_RELEASES = C_H_RELEASES
H_PUB_WAITING = C_H_PUB_WAITING
H_TOPIC_LEN = C_H_TOPIC_LEN
H_CLOSED_GEN = C_H_CLOSED_GEN
H_TOPIC = C_H_TOPIC
MAX_TOPIC = C_MAX_TOPIC
ROWS_OFF = C_ROWS_OFF
ROW_SIZE = C_ROW_SIZE
R_PID = C_R_PID
R_START = C_R_START
R_HOLD = C_R_HOLD
R_NEXT = C_R_NEXT
MAX_ROWS = C_MAX_ROWS
SLOTS_OFF = C_SLOTS_OFF
SLOT_SIZE = C_SLOT_SIZE
S_GEN = C_S_GEN
S_OFF = C_S_OFF
S_LEN = C_S_LEN
MAX_SLOTS = C_MAX_SLOTS
HDR_AREA = C_HDR_AREA
PAGE = C_PAGE
BELL_MAGIC = C_BELL_MAGIC
B_COUNTER = C_B_COUNTER
B_WAITERS = C_B_WAITERS
B_PUBGEN = C_B_PUBGEN
B_TOPIC_LEN = C_B_TOPIC_LEN
B_TOPIC = C_B_TOPIC
B_USERS = C_B_USERS
USER_SIZE = C_USER_SIZE
U_SEEN = C_U_SEEN
MAX_USERS = C_MAX_USERS
BELL_BYTES = C_BELL_BYTES


cdef inline uint64_t _align(uint64_t n, uint64_t a):
    return (n + a - 1) // a * a


def layout(uint32_t slots, uint64_t capacity):
    """(log length, data offset, slot bytes, file size) for ``slots`` slots of ``capacity`` payload bytes."""
    if not 2 <= slots <= C_MAX_SLOTS:
        raise ValueError(f"slots {slots} out of range [2, {C_MAX_SLOTS}]")
    log_len = 4 * slots
    data_off = _align(C_SLOTS_OFF + C_SLOT_SIZE * slots + 8 * log_len, C_PAGE)
    slot_bytes = _align(C_HDR_AREA + capacity, C_PAGE)
    return log_len, data_off, slot_bytes, data_off + slot_bytes * slots


cdef class Mapping:
    """A writable mmap pinned for raw atomic access. Keeps the mmap open while it (or a Lease) lives."""
    cdef Py_buffer _view
    cdef bint _pinned
    cdef uint8_t* base
    cdef readonly Py_ssize_t size
    cdef readonly object mm

    def __cinit__(self, mm, *args):
        PyObject_GetBuffer(mm, &self._view, PyBUF_WRITABLE)
        self._pinned = True
        self.base = <uint8_t*>self._view.buf
        self.size = self._view.len
        self.mm = mm

    def __dealloc__(self):
        if self._pinned:
            PyBuffer_Release(&self._view)

    cdef inline uint8_t* at(self, Py_ssize_t off, Py_ssize_t width) except NULL:
        if off < 0 or width < 0 or off > self.size - width or off % width:
            raise ValueError(f"offset {off} (width {width}) outside the {self.size}-byte mapping or unaligned")
        return self.base + off

    def ld64(self, Py_ssize_t off):
        return msf_ld64(self.at(off, 8))

    def st64(self, Py_ssize_t off, uint64_t v):
        msf_st64_sc(self.at(off, 8), v)

    def ld32(self, Py_ssize_t off):
        return msf_ld32(self.at(off, 4))

    def st32(self, Py_ssize_t off, uint32_t v):
        msf_st32(self.at(off, 4), v)
        msf_fence()

    def cas32(self, Py_ssize_t off, uint32_t expected, uint32_t desired):
        return bool(msf_cas32(self.at(off, 4), expected, desired))

    def cas64(self, Py_ssize_t off, uint64_t expected, uint64_t desired):
        return bool(msf_cas64(self.at(off, 8), expected, desired))

    def add32(self, Py_ssize_t off, uint32_t v):
        return msf_add32(self.at(off, 4), v)

    def sub32(self, Py_ssize_t off, uint32_t v):
        return msf_sub32(self.at(off, 4), v)

    def futex_wait(self, Py_ssize_t off, uint32_t expected, double timeout_s):
        """Sleep while the word at ``off`` is ``expected``, at most ``timeout_s``; returns 0 or an errno."""
        cdef uint8_t* p = self.at(off, 4)
        cdef int r
        with nogil:
            r = msf_futex_wait(p, expected, timeout_s)
        return r

    def futex_wake(self, Py_ssize_t off, int n=0x7fffffff):
        return msf_futex_wake(self.at(off, 4), n)

    def write(self, Py_ssize_t off, data):
        """Copy ``data`` (any contiguous buffer) to ``off``: one copy, streamed when large, without the GIL."""
        cdef Py_buffer v
        PyObject_GetBuffer(data, &v, PyBUF_SIMPLE)
        try:
            if off < 0 or v.len > self.size - off:
                raise ValueError(f"{v.len} bytes at {off} overrun the {self.size}-byte mapping")
            with nogil:
                msf_copy(self.base + off, <const uint8_t*>v.buf, v.len)
        finally:
            PyBuffer_Release(&v)

    def address(self):
        return <size_t>self.base


def address(buf):
    """The address of a buffer's first byte (to recognise a loaned slot handed back to publish)."""
    cdef Py_buffer v
    PyObject_GetBuffer(buf, &v, PyBUF_SIMPLE)
    a = <size_t>v.buf
    PyBuffer_Release(&v)
    return a


cdef class Lease


cdef class Segment(Mapping):
    """One publisher's ring for one topic. The geometry is read once and checked against the size."""
    cdef readonly uint32_t slots
    cdef readonly uint32_t log_len
    cdef readonly uint64_t slot_bytes
    cdef readonly uint64_t data_off
    cdef Py_ssize_t log_off
    cdef readonly Mapping bell            # the topic's doorbell: rung after every commit
    # publisher-side counters
    cdef readonly uint64_t overrun        # frames overwritten before a reader that wanted them took them
    cdef readonly uint64_t held_skips     # slots passed over because a reader held them

    def __init__(self, mm, Mapping bell):
        if self.size < C_SLOTS_OFF or msf_ld64(self.base + C_H_MAGIC) != C_MAGIC:
            raise ValueError("not a segment, or not initialised yet")
        if msf_ld32(self.base + C_H_VERSION) != C_VERSION:
            raise ValueError(f"segment version {msf_ld32(self.base + C_H_VERSION)} (this reader knows {C_VERSION})")
        slots = msf_ld32(self.base + C_H_SLOTS)
        cap = msf_ld64(self.base + C_H_SLOT_BYTES)
        if not 2 <= slots <= C_MAX_SLOTS or cap < C_HDR_AREA or cap % C_PAGE or cap > (1 << 40):
            raise ValueError(f"segment geometry out of range: {slots} slots of {cap} bytes")
        log_len, data_off, slot_bytes, size = layout(slots, cap - C_HDR_AREA)
        if msf_ld32(self.base + C_H_LOG_LEN) != log_len or msf_ld64(self.base + C_H_DATA_OFF) != data_off \
                or size > <uint64_t>self.size:
            raise ValueError(f"segment layout does not match its {self.size} bytes")
        self.slots = slots
        self.log_len = log_len
        self.slot_bytes = slot_bytes
        self.data_off = data_off
        self.log_off = C_SLOTS_OFF + C_SLOT_SIZE * slots
        self.bell = bell

    cdef inline uint8_t* _slot(self, uint32_t s):
        return self.base + C_SLOTS_OFF + C_SLOT_SIZE * s

    cdef inline uint8_t* _row(self, uint32_t r):
        return self.base + C_ROWS_OFF + C_ROW_SIZE * r

    def slot_data(self, uint32_t s):
        """Offset of slot ``s``'s first byte (its header area; the payload starts C_HDR_AREA later)."""
        if s >= self.slots:
            raise ValueError(f"slot {s} of {self.slots}")
        return self.data_off + self.slot_bytes * s

    # ------------------------------------------------------------ publisher
    def acquire(self):
        """A slot to write, marked as being written (odd generation): the oldest that no reader
        holds. Returns (slot, holder rows seen) or (-1, rows) when every slot is held."""
        cdef uint64_t tried = 0, g, best_g, old, want, n_old
        cdef uint32_t s, best, r
        cdef int holder
        cdef uint8_t* row
        holders = []
        for _ in range(self.slots):
            best = 0xffffffff
            best_g = 0
            for s in range(self.slots):
                if tried & (1ULL << s):
                    continue
                g = msf_ld64(self._slot(s) + C_S_GEN)
                if g & 1:                  # loaned out, being written
                    tried |= 1ULL << s
                    continue
                if best == 0xffffffff or g < best_g:
                    best, best_g = s, g
            if best == 0xffffffff:
                return -1, holders
            s = best
            old = best_g
            tried |= 1ULL << s
            # Dekker with the reader's hold: mark the slot odd, then look for a hold of its frame.
            # A reader stores its hold, then reads the generation; one of us sees the other.
            msf_st64_sc(self._slot(s) + C_S_GEN, old + 1)
            holder = -1
            if old:
                want = (old << 8) | (s + 1)
                n_old = old // 2 - 1
                for r in range(C_MAX_ROWS):
                    row = self._row(r)
                    if msf_ld32_sc(row + C_R_PID) == 0:
                        continue
                    if msf_ld64_sc(row + C_R_HOLD) == want:
                        holder = r
                        break
                if holder < 0:
                    for r in range(C_MAX_ROWS):
                        row = self._row(r)
                        if msf_ld32(row + C_R_PID) != 0 and msf_ld64(row + C_R_NEXT) <= n_old:
                            self.overrun += 1
                            break
            if holder >= 0:
                msf_st64_sc(self._slot(s) + C_S_GEN, old)   # given back untouched: the reader keeps it
                self.held_skips += 1
                holders.append(holder)
                continue
            return <int>s, holders
        return -1, holders

    def abandon(self, uint32_t s):
        """A slot acquired and not committed (a loan dropped): free it. Generation 0 matches no
        frame, so no reader can take what was half written."""
        if s >= self.slots:
            raise ValueError(f"slot {s} of {self.slots}")
        msf_st64_sc(self._slot(s) + C_S_GEN, 0)

    def commit(self, uint32_t s, uint64_t off, uint64_t length):
        """Publish slot ``s`` (its message at ``off`` within the slot, ``length`` bytes) as the next
        frame, then ring the topic's bell. Returns the frame's index."""
        if s >= self.slots or off > self.slot_bytes or length > self.slot_bytes - off:
            raise ValueError(f"slot {s}: {length} bytes at {off} do not fit")
        cdef uint64_t m = msf_ld64(self.base + C_H_WRITE_COUNT)
        cdef uint8_t* sl = self._slot(s)
        msf_st64(sl + C_S_OFF, off)
        msf_st64(sl + C_S_LEN, length)
        msf_st64_sc(sl + C_S_GEN, 2 * m + 2)
        msf_st64_sc(self.base + self.log_off + 8 * (m % self.log_len), (m << 16) | s)
        msf_st64_sc(self.base + C_H_WRITE_COUNT, m + 1)
        self._ring()
        return m

    cdef inline void _ring(self):
        cdef uint8_t* b = self.bell.base
        msf_add32(b + C_B_COUNTER, 1)
        if msf_ld32_sc(b + C_B_WAITERS):
            msf_futex_wake(b + C_B_COUNTER, 0x7fffffff)

    def ring(self):
        self._ring()

    # ------------------------------------------------------------ reader
    def claim_row(self, uint32_t pid, uint64_t start, uint64_t next_index):
        """A reader row for this process (its pid and start time), reading from ``next_index``; -1 if all are taken."""
        cdef uint32_t r
        for r in range(C_MAX_ROWS):
            row = self._row(r)
            if msf_ld32(row + C_R_PID) == 0 and msf_cas32(row + C_R_PID, 0, pid):
                msf_st64(row + C_R_HOLD, 0)
                msf_st64(row + C_R_START, start)
                msf_st64_sc(row + C_R_NEXT, next_index)
                return <int>r
        return -1

    def free_row(self, uint32_t r, uint32_t pid):
        """Leave: drop the hold and the row (only if it is still ``pid``'s: a reaper may have taken it)."""
        if r >= C_MAX_ROWS:
            return
        row = self._row(r)
        if msf_ld32(row + C_R_PID) != pid:
            return
        msf_st64_sc(row + C_R_HOLD, 0)
        # the start time goes before the pid: a row claimed again meanwhile reads (pid, 0), which a
        # reaper takes for alive, never (new pid, old start), which it would take for dead
        msf_st64_sc(row + C_R_START, 0)
        msf_cas32(row + C_R_PID, pid, 0)
        self._released()

    def row_owner(self, uint32_t r):
        """(pid, start time) of row ``r``; pid 0 if free."""
        if r >= C_MAX_ROWS:
            raise ValueError(f"row {r}")
        row = self._row(r)
        return msf_ld32(row + C_R_PID), msf_ld64(row + C_R_START)

    def reap_row(self, uint32_t r, uint32_t pid):
        """A dead reader's row: free it and its hold (if it is still ``pid``'s)."""
        if r >= C_MAX_ROWS:
            return False
        row = self._row(r)
        if msf_ld32(row + C_R_PID) != pid:
            return False
        msf_st64_sc(row + C_R_HOLD, 0)
        msf_st64_sc(row + C_R_START, 0)
        return bool(msf_cas32(row + C_R_PID, pid, 0))

    cdef inline void _released(self):
        if msf_ld32_sc(self.base + C_H_PUB_WAITING):
            msf_add32(self.base + C_H_RELEASES, 1)
            msf_futex_wake(self.base + C_H_RELEASES, 0x7fffffff)

    def take(self, uint32_t r):
        """The next frame for reader row ``r``, held: a Lease, or None when there is none yet.
        Also returns how many frames were skipped because the ring overtook this reader.
        Taking a frame gives back the one held before."""
        if r >= C_MAX_ROWS:
            raise ValueError(f"row {r}")
        cdef uint8_t* row = self._row(r)
        cdef uint64_t n = msf_ld64(row + C_R_NEXT)
        cdef uint64_t w, e, want, g, off, length, hold
        cdef uint64_t skipped = 0
        cdef uint32_t s
        cdef int spins
        cdef uint8_t* log_base = self.base + self.log_off
        cdef Lease lease
        while True:
            w = msf_ld64(self.base + C_H_WRITE_COUNT)
            if n >= w:
                if n > w:                  # a forged or reset counter: follow it
                    n = w
                msf_st64(row + C_R_NEXT, n)
                return None, skipped
            if w - n > self.log_len:       # the log has moved past this reader
                skipped += w - self.log_len - n
                n = w - self.log_len
            e = msf_ld64(log_base + 8 * (n % self.log_len))
            s = <uint32_t>(e & 0xffff)
            if (e >> 16) != n or s >= self.slots:
                skipped += 1               # overwritten by a newer frame (or garbage): gone
                n += 1
                continue
            want = 2 * n + 2
            if msf_ld64(self._slot(s) + C_S_GEN) != want:
                skipped += 1
                n += 1
                continue
            hold = (want << 8) | (s + 1)
            msf_st64_sc(row + C_R_HOLD, hold)
            g = msf_ld64_sc(self._slot(s) + C_S_GEN)
            spins = 0
            while g & 1 and spins < 20000:  # a publisher that saw the hold gives the slot back at once
                msf_pause()
                spins += 1
                g = msf_ld64_sc(self._slot(s) + C_S_GEN)
            if g != want:
                msf_st64_sc(row + C_R_HOLD, 0)
                skipped += 1
                n += 1
                continue
            off = msf_ld64(self._slot(s) + C_S_OFF)
            length = msf_ld64(self._slot(s) + C_S_LEN)
            n += 1
            msf_st64(row + C_R_NEXT, n)
            self._released()               # the previous hold, replaced by this one
            if off > self.slot_bytes or length > self.slot_bytes - off:
                msf_st64_sc(row + C_R_HOLD, 0)
                skipped += 1
                continue
            lease = <Lease>Lease.__new__(Lease)
            lease.seg = self
            lease.ptr = self.base + self.data_off + self.slot_bytes * s + off
            lease.n = <Py_ssize_t>length
            lease.row = r
            lease.hold = hold
            return lease, skipped

    def release(self, uint32_t r, uint64_t hold):
        """Give back the hold ``hold`` of row ``r``, if the row still holds it."""
        if r >= C_MAX_ROWS:
            return
        if msf_cas64(self._row(r) + C_R_HOLD, hold, 0):
            self._released()

    def pending(self, uint32_t r):
        """Frames published and not yet taken by row ``r``."""
        if r >= C_MAX_ROWS:
            return 0
        w = msf_ld64(self.base + C_H_WRITE_COUNT)
        n = msf_ld64(self._row(r) + C_R_NEXT)
        return w - n if w > n else 0


cdef class Lease:
    """A held slot's message, as a read-only buffer. ``_msf_release`` gives the slot back
    (``Frame.release`` calls it); the mapping stays alive while a view of this lives."""
    cdef Segment seg
    cdef const uint8_t* ptr
    cdef Py_ssize_t n
    cdef uint32_t row
    cdef uint64_t hold
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def _msf_release(self):
        if self.hold:
            self.seg.release(self.row, self.hold)
            self.hold = 0

    @property
    def held(self):
        return self.hold != 0

    def __len__(self):
        return self.n

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a shared-memory frame is read-only")
        self.shape[0] = self.n
        self.strides[0] = 1
        view.obj = self
        view.buf = <void*>self.ptr
        view.len = self.n
        view.readonly = 1
        view.itemsize = 1
        view.format = NULL
        if flags & 4:                                # PyBUF_FORMAT
            view.format = "B"
        view.ndim = 1
        view.shape = self.shape if flags & 8 else NULL
        view.strides = self.strides if flags & 0x18 == 0x18 else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass
