# cython: language_level=3, embedsignature=True
"""Compiled core of the msight_fast wire codec (see docs/wire-format.md).

Frame header v1.0, little-endian; the payload starts at ``payload_offset``, a multiple of 64::

    off  size  field
    ---  ----  -----------------------------------------------------------------
      0     4  magic  93 4D 53 46  ("\\x93MSF": first byte not ASCII)
      4     1  major version (1): another major is rejected
      5     1  minor version (0): a newer minor is accepted, unknown records skipped
      6     2  flags: bit 0 payload CRC32C present, bit 1 ndarray payload
      8     4  header_len: bytes 0 .. end of the last record (88 .. 65536)
     12     4  header CRC32C over bytes [0, 12) then [16, header_len)
     16     2  fixed_len: where the records start (88 in v1.0)
     18     2  reserved, 0
     20     4  payload CRC32C (0 unless flag bit 0)
     24     8  payload_offset (multiple of 64, >= header_len, zero padding before it)
     32     8  payload_len (== frame length - payload_offset)
     40     8  frame_id          u64
     48     8  seq               u64
     56     8  publisher_id      u64
     64     8  capture_ts_ns     i64
     72     8  creation_ts_ns    i64
     80     8  publish_ts_ns     i64
     88     -  records: u16 tag, u16 flags (0), u32 len, len bytes
               1 sensor_name  2 device_name  3 encoding  (UTF-8)
               4 dtype descriptor  5 shape (u64 x ndim)  6 user map

Every length is checked against the bytes really present before it is used; nothing here reads
outside the caller's buffer, whatever the header says.
"""
cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from time import monotonic as _monotonic, time_ns as _time_ns

import numpy as np

from .. import _schema as S
from ..errors import BackendUnavailable, FrameError, MsightFastError

cnp.import_array()

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    /* Large buffers: ask for transparent huge pages before the first touch, as numpy does for
       its own allocations; otherwise the copy into a fresh 25 MB bytes object spends much of
       its time in 4 KB page faults. */
    static void msf_advise_huge(void *p, size_t n) {
        uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
        uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)4095;
        if (n >= (4u << 20) && e > a) madvise((void *)a, e - a, MADV_HUGEPAGE);
    }
    #else
    static void msf_advise_huge(void *p, size_t n) { (void)p; (void)n; }
    #endif
    """
    void msf_advise_huge(void* p, size_t n) nogil

cdef extern from *:
    """
    #include <time.h>
    /* The wall clock time.time_ns reads (CLOCK_REALTIME), without a Python call: 0 where there
       is none, and the caller asks time.time_ns itself. */
    static int msf_now_ns(int64_t *out) {
    #if defined(CLOCK_REALTIME) && !defined(_WIN32)
        struct timespec ts;
        if (clock_gettime(CLOCK_REALTIME, &ts) == 0) {
            *out = (int64_t)ts.tv_sec * 1000000000 + (int64_t)ts.tv_nsec;
            return 1;
        }
    #endif
        return 0;
    }
    """
    int msf_now_ns(int64_t* out) nogil


cdef inline int64_t _now_ns() except? -1:
    """``time.time_ns()`` (the same clock), a small frame's publish without the Python call."""
    cdef int64_t t
    if msf_now_ns(&t):
        return t
    return _time_ns()


cdef extern from "numpy/arrayobject.h":
    object PyArray_NewFromDescr(void* subtype, cnp.dtype descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, void* obj)

cdef extern from "_crc32c.h" nogil:
    void msf_crc32c_init()
    uint32_t msf_crc32c(uint32_t crc, const void* buf, size_t n)
    uint32_t msf_crc32c_sw(uint32_t crc, const void* buf, size_t n)
    int msf_crc_hw
    uint16_t msf_ld16(const uint8_t* p)
    uint32_t msf_ld32(const uint8_t* p)
    uint64_t msf_ld64(const uint8_t* p)
    void msf_st16(uint8_t* p, uint16_t v)
    void msf_st32(uint8_t* p, uint32_t v)
    void msf_st64(uint8_t* p, uint64_t v)

msf_crc32c_init()

cdef enum:
    FIXED_LEN = 88
    FRAG_HEADER_LEN = 64
    ALIGN = 64
    MAX_HEADER_LEN = 65536
    MAX_NDIM = 32
    FLAG_PAYLOAD_CRC = 1
    FLAG_NDARRAY = 2
    FRAG_VERSION_MINOR = 1
    NOGIL_BYTES = 65536       # below this, releasing the GIL costs more than it saves
    DTYPE_CACHE_MAX = 1024
    DTYPE_CACHE_MAX_BYTES_ = 262144

# the twin and this core must agree on every constant
assert (S.FIXED_LEN, S.FRAG_HEADER_LEN, S.ALIGN, S.MAX_HEADER_LEN, S.MAX_NDIM, S.FLAG_PAYLOAD_CRC,
        S.FLAG_NDARRAY, S.FRAG_VERSION_MINOR) == (FIXED_LEN, FRAG_HEADER_LEN, ALIGN, MAX_HEADER_LEN, MAX_NDIM,
                                                  FLAG_PAYLOAD_CRC, FLAG_NDARRAY, FRAG_VERSION_MINOR)
cdef bytes MAGIC = S.MAGIC
cdef bytes FRAG_MAGIC = S.FRAG_MAGIC
cdef int MAX_NAME_BYTES = S.MAX_NAME_BYTES
cdef int MAX_ENCODING_BYTES = S.MAX_ENCODING_BYTES
cdef str EMPTY = ""

HARDWARE_CRC32C = bool(msf_crc_hw)

# descriptor bytes -> dtype, and dtype -> descriptor bytes: each distinct dtype is parsed once.
# Bounded in entries and in descriptor bytes: a parsed dtype takes at most ~12x its descriptor's
# size (measured), so forged descriptors can pin at most a few MB here.
DTYPE_CACHE_MAX_ENTRIES = DTYPE_CACHE_MAX
DTYPE_CACHE_MAX_BYTES = DTYPE_CACHE_MAX_BYTES_
cdef dict _dtype_from_blob = {}
cdef Py_ssize_t _dtype_cache_nbytes = 0
cdef dict _blob_from_dtype = {}


def _dtype_cache_bytes():
    """Descriptor bytes held by the decode-side dtype cache (for the tests of its bound)."""
    return _dtype_cache_nbytes


cdef tuple _dtype_entry(bytes blob, Py_ssize_t where):
    """The dtype of a descriptor, the dimensions its sub-array fields add (S.subarray_ndim), and
    how to check its text fields (S.ucs4_plan; None for most dtypes)."""
    global _dtype_cache_nbytes
    got = _dtype_from_blob.get(blob)
    if got is None:
        dt = S.dtype_from_wire(blob, where)
        got = (dt, S.subarray_ndim(dt), S.ucs4_plan(dt))
        if len(_dtype_from_blob) >= DTYPE_CACHE_MAX or \
                _dtype_cache_nbytes + len(blob) > DTYPE_CACHE_MAX_BYTES_:
            _dtype_from_blob.clear()       # forged descriptors cannot grow the cache without bound
            _dtype_cache_nbytes = 0
        _dtype_from_blob[blob] = got
        _dtype_cache_nbytes += len(blob)
    return <tuple>got


cdef tuple _blob_entry(object dt):
    """(descriptor bytes, dimensions its sub-array fields add, its text-field check or None)."""
    got = _blob_from_dtype.get(dt)
    if got is None:
        got = (S.dtype_to_wire(dt), S.subarray_ndim(dt), S.ucs4_plan(dt))
        if len(_blob_from_dtype) >= DTYPE_CACHE_MAX:
            _blob_from_dtype.clear()
        _blob_from_dtype[dt] = got
    return <tuple>got


cdef inline uint32_t _crc(uint32_t crc, const uint8_t* p, size_t n) noexcept:
    if n >= NOGIL_BYTES:
        with nogil:
            crc = msf_crc32c(crc, p, n)
        return crc
    return msf_crc32c(crc, p, n)


@cython.freelist(16)
@cython.final
cdef class _View:
    """Exports [ptr, ptr + n) read-only while holding its owner alive."""
    cdef object owner
    cdef const uint8_t* ptr
    cdef Py_ssize_t n

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE:
            # the bytes belong to an immutable object or a received message: never writable
            raise BufferError("msight_fast frame buffers are read-only")
        view.buf = <void*>self.ptr
        view.obj = self
        view.len = self.n
        view.readonly = 1
        view.itemsize = 1
        view.format = NULL
        if flags & 4:                                # PyBUF_FORMAT
            view.format = "B"
        view.ndim = 1
        view.shape = NULL
        view.strides = NULL
        if flags & 8:                                # PyBUF_ND
            view.shape = &self.n
        if flags & 0x18 == 0x18:                     # PyBUF_STRIDES
            view.strides = &view.itemsize
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass


cdef inline memoryview _view_of(object owner, const uint8_t* ptr, Py_ssize_t n):
    cdef _View v = _View.__new__(_View)
    v.owner = owner
    v.ptr = ptr
    v.n = n
    return memoryview(v)


cdef object _pin(object obj, const uint8_t** ptr, Py_ssize_t* n):
    """A read-only object that keeps obj's bytes where they are; sets ptr and n."""
    cdef Py_buffer view
    if type(obj) is bytes:
        ptr[0] = <const uint8_t*>PyBytes_AS_STRING(obj)
        n[0] = PyBytes_GET_SIZE(obj)
        return obj
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(obj).__name__}") from None
    if not mv.c_contiguous:
        raise FrameError("the buffer is not C-contiguous")
    mv = mv.toreadonly()
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    ptr[0] = <const uint8_t*>view.buf
    n[0] = view.len
    PyBuffer_Release(&view)            # mv itself still holds obj's export
    return mv


def crc32c(data, uint32_t crc=0):
    """CRC32C of ``data``, continuing from ``crc`` (0 to start); hardware-accelerated where possible."""
    cdef const uint8_t* p
    cdef Py_ssize_t n
    keep = _pin(data, &p, &n)
    return _crc(crc, p, n)


def _crc32c_software(data, uint32_t crc=0):
    """The table fallback, exposed so tests can check it against the hardware path."""
    cdef const uint8_t* p
    cdef Py_ssize_t n
    keep = _pin(data, &p, &n)
    return msf_crc32c_sw(crc, p, n)


cdef inline int _check_text(object s, str what, Py_ssize_t limit) except -1:
    """A text field is None, or a str whose UTF-8 fits ``limit`` (checked in C, as encode will)."""
    cdef Py_ssize_t n
    if s is not None:
        _utf8_of(s, what, limit, &n)
    return 0


# frame ids: popped straight from _schema's pool (list.pop hands each to one caller); its
# new_frame_id refills it, and a forked child empties this same list
cdef list _ID_POOL = S._id_pool


@cython.freelist(32)
@cython.final
cdef class Frame:
    """One sensor frame: metadata plus an ndarray or opaque bytes payload.

    Build one with :meth:`from_array` or :meth:`from_bytes`; :func:`decode` returns one whose
    ``array`` / ``data`` are read-only views into the received buffer.
    """
    cdef readonly object array
    cdef object _owner
    cdef bint _lent                     # decoded: _owner may be a lease to give back (release)
    cdef const uint8_t* _ptr
    cdef Py_ssize_t _len
    cdef bytes _dtype_blob
    cdef public object encoding
    cdef public object sensor_name
    cdef public object device_name
    cdef public uint64_t frame_id
    cdef public uint64_t seq
    cdef public uint64_t publisher_id
    cdef public int64_t capture_ts_ns
    cdef public int64_t creation_ts_ns
    cdef public int64_t publish_ts_ns
    cdef public object meta

    def __init__(self):
        self._blank()
        self.meta = {}

    cdef inline _blank(self):
        """__init__'s state but meta (set by the caller); ``from_*`` call it on ``__new__``'s frame,
        which spares them a Python-level ``__init__``."""
        cdef int64_t now = _now_ns()
        self.array = None
        self._owner = b""
        self._ptr = <const uint8_t*>PyBytes_AS_STRING(b"")
        self._len = 0
        self.encoding = self.sensor_name = self.device_name = EMPTY
        self.capture_ts_ns = self.creation_ts_ns = now
        self.publish_ts_ns = 0

    cdef _init_common(self, sensor_name, encoding, device_name, frame_id, capture_ts_ns, meta):
        _check_text(sensor_name, "sensor_name", MAX_NAME_BYTES)
        _check_text(device_name, "device_name", MAX_NAME_BYTES)
        _check_text(encoding, "encoding", MAX_ENCODING_BYTES)
        self.sensor_name = sensor_name or EMPTY
        self.device_name = device_name or EMPTY
        self.encoding = encoding or EMPTY
        if frame_id is not None:
            self.frame_id = frame_id
        elif _ID_POOL:
            try:
                self.frame_id = _ID_POOL.pop()
            except IndexError:             # taken meanwhile (possible where threads run without a GIL)
                self.frame_id = S.new_frame_id()
        else:
            self.frame_id = S.new_frame_id()
        if capture_ts_ns is not None:
            self.capture_ts_ns = capture_ts_ns
        if meta:
            self.meta = dict(meta)
            S.meta_to_wire(self.meta)      # validate now, not at publish time
        else:
            self.meta = {}

    @classmethod
    def from_array(cls, arr, *, sensor_name, encoding=None, device_name=None, frame_id=None,
                   capture_ts_ns=None, meta=None):
        """A frame whose payload is ``arr`` (C-contiguous arrays are not copied)."""
        if not isinstance(arr, cnp.ndarray):
            raise TypeError(f"from_array needs a numpy.ndarray, not {type(arr).__name__}")
        cdef cnp.ndarray a = arr
        entry = _blob_entry(a.dtype)
        blob = entry[0]
        cdef int subndim = entry[1]
        if a.ndim > MAX_NDIM:
            raise FrameError(f"{a.ndim} dimensions (limit {MAX_NDIM})")
        if a.ndim + subndim > MAX_NDIM:
            raise FrameError(f"{a.ndim} dimensions plus {subndim} from sub-array fields (limit {MAX_NDIM})")
        if not cnp.PyArray_IS_C_CONTIGUOUS(a):
            a = np.ascontiguousarray(a).reshape(arr.shape)   # the one copy a strided array needs
        if entry[2] is not None:          # what a receiver would reject is refused here
            S.check_ucs4(entry[2], a, 0)
        cdef Frame f = Frame.__new__(Frame)
        f._blank()
        f._init_common(sensor_name, encoding if encoding is not None else S.default_encoding(a),
                       device_name, frame_id, capture_ts_ns, meta)
        f.array = a
        f._dtype_blob = blob
        f._owner = a
        f._ptr = <const uint8_t*>cnp.PyArray_DATA(a)
        f._len = cnp.PyArray_NBYTES(a)
        return f

    @classmethod
    def from_bytes(cls, data, *, sensor_name, encoding, device_name=None, frame_id=None,
                   capture_ts_ns=None, meta=None):
        """A frame whose payload is the bytes of ``data`` (any contiguous buffer, not copied)."""
        cdef Frame f = Frame.__new__(Frame)
        f._blank()
        f._owner = _pin(data, &f._ptr, &f._len)
        f._init_common(sensor_name, encoding, device_name, frame_id, capture_ts_ns, meta)
        return f

    @property
    def data(self):
        """The payload bytes, read-only."""
        return _view_of(self._owner, self._ptr, self._len)

    @property
    def nbytes(self):
        return self._len

    def release(self):
        """Give back the shared buffer this frame views, if its backend lends one (shm): the array
        and data must not be used after. Idempotent; a no-op for other frames.

        Only a frame returned by :func:`decode` gives its buffer back: it calls the ``_msf_release``
        of the object it was decoded from (behind a memoryview, its exporter), once per frame."""
        if not self._lent:
            return
        self._lent = False                # once, even if the lease's release raises
        o = self._owner
        if type(o) is memoryview:         # _pin's read-only view: the lease is its exporter
            o = o.obj
        r = getattr(o, "_msf_release", None)
        if r is not None:
            r()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        if self.array is not None:
            dt = self.array.dtype
            what = f"array={dt.str if dt.names is None else 'struct'}{list(self.array.shape)}"
        else:
            what = f"bytes={self._len}"
        return (f"Frame(sensor_name={self.sensor_name!r}, encoding={self.encoding!r}, {what}, "
                f"frame_id={self.frame_id}, seq={self.seq})")


# ---------------------------------------------------------------- encode
cdef inline uint8_t* _record(uint8_t* p, uint16_t tag, const void* src, Py_ssize_t n) noexcept:
    msf_st16(p, tag)
    msf_st16(p + 2, 0)
    msf_st32(p + 4, <uint32_t>n)
    if n:
        memcpy(p + 8, src, n)
    return p + 8 + n


cdef struct _Hdr:
    # a frame's header, planned (``_plan``) before it is written (``_fill``)
    Py_ssize_t header_len, offset, ls, ld, le, lm, lt, ls_shape
    const char* s_sensor
    const char* s_device
    const char* s_enc
    const char* s_blob
    const char* s_meta
    uint16_t flags
    uint32_t pcrc


cdef object _plan(Frame f, bint checksum, _Hdr* h):
    """Check ``f``'s fields and size its header into ``h`` (the payload CRC too, when asked).
    Returns what ``h`` points into (None where the frame alone holds it): keep it until ``_fill``
    has written the header. No Python runs between the return and the caller's ``_fill`` (which
    must follow at once)."""
    cdef cnp.ndarray a = None
    cdef bytes meta_b = None
    cdef bytes blob = None
    _check_text(f.sensor_name or None, "sensor_name", MAX_NAME_BYTES)
    _check_text(f.device_name or None, "device_name", MAX_NAME_BYTES)
    _check_text(f.encoding or None, "encoding", MAX_ENCODING_BYTES)
    h.lm = h.lt = h.ls_shape = 0
    h.s_blob = h.s_meta = NULL
    cdef uint16_t flags = 0
    if f.array is not None:
        a = f.array
        flags |= FLAG_NDARRAY
        blob = f._dtype_blob
        if blob is None:
            blob = f._dtype_blob = _blob_entry(a.dtype)[0]
        h.lt = len(blob)
        h.s_blob = PyBytes_AS_STRING(blob)
    if f.meta:
        meta_b = S.meta_to_wire(f.meta)
        h.lm = len(meta_b)
        h.s_meta = PyBytes_AS_STRING(meta_b)
    h.pcrc = 0
    if checksum:
        flags |= FLAG_PAYLOAD_CRC
        h.pcrc = _crc(0, f._ptr, f._len)
    # Python may have run above (and a large CRC lets go of the GIL): the text is taken last, and
    # held (returned) with what else the pointers point into, so a field another thread sets
    # meanwhile is written as it is now, never from freed UTF-8
    sensor, device, enc = f.sensor_name, f.device_name, f.encoding
    h.ls = h.ld = h.le = 0
    h.s_sensor = h.s_device = h.s_enc = NULL
    if sensor:
        h.s_sensor = _utf8_of(sensor, "sensor_name", MAX_NAME_BYTES, &h.ls)
    if device:
        h.s_device = _utf8_of(device, "device_name", MAX_NAME_BYTES, &h.ld)
    if enc:
        h.s_enc = _utf8_of(enc, "encoding", MAX_ENCODING_BYTES, &h.le)
    if a is not None:
        h.ls_shape = 8 * a.ndim                # last: an array's shape can be set in place
    cdef Py_ssize_t header_len = FIXED_LEN
    if h.ls: header_len += 8 + h.ls
    if h.ld: header_len += 8 + h.ld
    if h.le: header_len += 8 + h.le
    if a is not None: header_len += 16 + h.lt + h.ls_shape
    if meta_b is not None: header_len += 8 + h.lm
    if header_len > MAX_HEADER_LEN:
        raise FrameError(f"header of {header_len} bytes exceeds {MAX_HEADER_LEN}")
    h.header_len = header_len
    h.offset = (header_len + ALIGN - 1) & ~(ALIGN - 1)
    h.flags = flags
    if (meta_b is None and blob is None and type(sensor) is str and type(device) is str
            and type(enc) is str):
        return None             # nothing ran Python since the text was read, and the frame holds it
    return (meta_b, blob, sensor, device, enc)


cdef void _fill(Frame f, const _Hdr* h, uint8_t* out) noexcept:
    """Write the header ``_plan`` sized into ``out`` (``h.offset`` bytes, padding included)."""
    cdef Py_ssize_t i
    memcpy(out, <const char*>MAGIC, 4)
    out[4] = 1
    out[5] = 0
    msf_st16(out + 6, h.flags)
    msf_st32(out + 8, <uint32_t>h.header_len)
    msf_st16(out + 16, FIXED_LEN)
    msf_st16(out + 18, 0)
    msf_st32(out + 20, h.pcrc)
    msf_st64(out + 24, <uint64_t>h.offset)
    msf_st64(out + 32, <uint64_t>f._len)
    msf_st64(out + 40, f.frame_id)
    msf_st64(out + 48, f.seq)
    msf_st64(out + 56, f.publisher_id)
    msf_st64(out + 64, <uint64_t>f.capture_ts_ns)
    msf_st64(out + 72, <uint64_t>f.creation_ts_ns)
    msf_st64(out + 80, <uint64_t>f.publish_ts_ns)
    cdef uint8_t* p = out + FIXED_LEN
    if h.ls: p = _record(p, 1, h.s_sensor, h.ls)
    if h.ld: p = _record(p, 2, h.s_device, h.ld)
    if h.le: p = _record(p, 3, h.s_enc, h.le)
    cdef cnp.ndarray a
    if h.flags & FLAG_NDARRAY:
        a = f.array
        p = _record(p, 4, h.s_blob, h.lt)
        p = _record(p, 5, NULL, 0)
        msf_st32(p - 4, <uint32_t>h.ls_shape)
        for i in range(h.ls_shape >> 3):
            msf_st64(p + 8 * i, <uint64_t>a.shape[i])
        p += h.ls_shape
    if h.s_meta != NULL:
        p = _record(p, 6, h.s_meta, h.lm)
    memset(p, 0, h.offset - h.header_len)
    msf_st32(out + 12, msf_crc32c(msf_crc32c(0, out, 12), out + 16, h.header_len - 16))


cdef bytes _header(Frame f, bint checksum, Py_ssize_t* out_len):
    cdef _Hdr h
    keep = _plan(f, checksum, &h)
    out = PyBytes_FromStringAndSize(NULL, h.offset)
    _fill(f, &h, <uint8_t*>PyBytes_AS_STRING(out))
    out_len[0] = h.offset
    return out


cdef const char* _utf8_of(object s, str what, Py_ssize_t limit, Py_ssize_t* n) except NULL:
    if not isinstance(s, str):
        raise FrameError(f"{what} must be a str, not {type(s).__name__}")
    cdef const char* c
    try:
        c = PyUnicode_AsUTF8AndSize(s, n)    # cached by str itself: no copy
    except UnicodeEncodeError:
        raise FrameError(f"{what} is not encodable as UTF-8 (it holds a lone surrogate)") from None
    if n[0] > limit:
        raise FrameError(f"{what} is {n[0]} bytes of UTF-8 (limit {limit})")
    return c


def encode_parts(Frame frame not None, *, bint checksum=False):
    """[header, payload]: the payload is a read-only memoryview of the frame's own buffer (no copy)."""
    cdef Py_ssize_t hl
    return [_header(frame, checksum, &hl), _view_of(frame._owner, frame._ptr, frame._len)]


def frame_for(obj, default_name, dict fields not None):
    """``Bus.publish``'s frame of ``obj``: ``Frame.from_array`` of an ndarray, else
    ``Frame.from_bytes``, with ``fields`` as their keywords; ``sensor_name`` defaults to
    ``default_name``, and a buffer's ``encoding`` to "bytes". ``fields`` (a dict, not a subclass)
    is not changed."""
    return _frame_for(obj, default_name, fields)


cdef Frame _frame_for(obj, default_name, dict fields):
    if isinstance(obj, cnp.ndarray):
        kw = dict(fields)
        kw.setdefault("sensor_name", default_name)
        return Frame.from_array(obj, **kw)
    # a buffer: the fields read here instead of re-packed as keywords (half a small frame's
    # frame-building cost); an unknown one goes the keyword way, for its usual TypeError
    sensor_name, encoding = default_name, "bytes"
    device_name = frame_id = capture_ts_ns = meta = None
    if fields:
        for k, v in fields.items():
            if k == "sensor_name":
                sensor_name = v
            elif k == "encoding":
                encoding = v
            elif k == "device_name":
                device_name = v
            elif k == "frame_id":
                frame_id = v
            elif k == "capture_ts_ns":
                capture_ts_ns = v
            elif k == "meta":
                meta = v
            else:
                kw = dict(fields)
                kw.setdefault("sensor_name", default_name)
                kw.setdefault("encoding", "bytes")
                return Frame.from_bytes(obj, **kw)
    cdef Frame f = Frame.__new__(Frame)
    f._blank()
    f._owner = _pin(obj, &f._ptr, &f._len)
    f._init_common(sensor_name, encoding, device_name, frame_id, capture_ts_ns, meta)
    return f


def stamp_parts(Frame frame not None, seq, publisher_id, bint checksum=False):
    """A publisher's step in one call: set ``seq``, ``publisher_id`` and ``publish_ts_ns`` (the wall
    clock now: the clock ``time.time_ns`` reads, which every other timestamp here is read from),
    then return ``encode_parts(frame, checksum=checksum)``."""
    # integers only (a float is a TypeError, as in the twin), checked before anything is set
    cdef uint64_t s = PyNumber_Index(seq), p = PyNumber_Index(publisher_id)
    frame.seq = s
    frame.publisher_id = p
    frame.publish_ts_ns = _now_ns()
    cdef Py_ssize_t hl
    return [_header(frame, checksum, &hl), _view_of(frame._owner, frame._ptr, frame._len)]


def encode(Frame frame not None, *, bint checksum=False):
    """One contiguous buffer: the header followed by one copy of the payload."""
    cdef Py_ssize_t hl
    hdr = _header(frame, checksum, &hl)
    out = PyBytes_FromStringAndSize(NULL, hl + frame._len)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    msf_advise_huge(o, hl + frame._len)
    memcpy(o, PyBytes_AS_STRING(hdr), hl)
    if frame._len >= NOGIL_BYTES:
        with nogil:
            memcpy(o + hl, frame._ptr, frame._len)
    else:
        memcpy(o + hl, frame._ptr, frame._len)
    return out


# ---------------------------------------------------------------- decode
# A stream repeats its sensor name, device name and encoding on every frame: remember the last
# string decoded for each and reuse it when the bytes match, instead of allocating a new str.
cdef list _last_raw = [b"", b"", b"", b""]
cdef list _last_str = [EMPTY, EMPTY, EMPTY, EMPTY]


cdef inline str _utf8_field(int slot, const uint8_t* p, Py_ssize_t n, str what, Py_ssize_t limit, Py_ssize_t off):
    if n > limit:
        raise FrameError(f"{what} of {n} bytes exceeds {limit} at offset {off}")
    cdef bytes last = <bytes>_last_raw[slot]
    if PyBytes_GET_SIZE(last) == n and memcmp(PyBytes_AS_STRING(last), p, n) == 0:
        return <str>_last_str[slot]
    try:
        s = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        raise FrameError(f"{what} is not valid UTF-8 at offset {off}") from None
    _last_raw[slot] = PyBytes_FromStringAndSize(<const char*>p, n)
    _last_str[slot] = s
    return s


def decode(buf):
    """Decode one frame. ``frame.array`` (or ``frame.data``) is a read-only view into ``buf``."""
    cdef const uint8_t* b
    cdef Py_ssize_t n
    owner = _pin(buf, &b, &n)
    if n < FIXED_LEN:
        raise FrameError(f"truncated frame: {n} bytes, a header needs at least {FIXED_LEN} (at offset {n})")
    if memcmp(b, <const char*>MAGIC, 4) != 0:
        raise FrameError(f"bad magic {(<const char*>b)[:4]!r} at offset 0 (expected {MAGIC!r})")
    if b[4] != 1:
        raise FrameError(f"unsupported wire format major version {b[4]} at offset 4 (this reader knows 1)")
    cdef uint16_t flags = msf_ld16(b + 6)
    cdef uint64_t header_len = msf_ld32(b + 8)
    cdef uint64_t hmax = n if n < MAX_HEADER_LEN else MAX_HEADER_LEN
    if header_len < FIXED_LEN or header_len > hmax:
        raise FrameError(f"header length {header_len} at offset 8 out of range [{FIXED_LEN}, {hmax}]")
    if msf_crc32c(msf_crc32c(0, b, 12), b + 16, header_len - 16) != msf_ld32(b + 12):
        raise FrameError("header CRC32C mismatch at offset 12")
    cdef uint64_t fixed_len = msf_ld16(b + 16)
    if fixed_len < FIXED_LEN or fixed_len > header_len:
        raise FrameError(f"fixed-part length {fixed_len} at offset 16 out of range [{FIXED_LEN}, {header_len}]")
    cdef uint32_t pcrc = msf_ld32(b + 20)
    cdef uint64_t poff = msf_ld64(b + 24)
    cdef uint64_t plen = msf_ld64(b + 32)
    if poff % ALIGN or poff < header_len or poff > <uint64_t>n:
        raise FrameError(f"payload offset {poff} at offset 24 is not a multiple of {ALIGN} in [{header_len}, {n}]")
    if plen != <uint64_t>n - poff:
        raise FrameError(f"payload length {plen} at offset 32 does not match the {n - poff} bytes after the header")
    cdef uint64_t i
    for i in range(header_len, poff):
        if b[i]:
            raise FrameError(f"non-zero padding between offsets {header_len} and {poff}")
    if flags & FLAG_PAYLOAD_CRC:
        if _crc(0, b + poff, plen) != pcrc:
            raise FrameError(f"payload CRC32C mismatch (payload at offset {poff})")
    elif pcrc:
        raise FrameError("payload CRC32C set at offset 20 without the checksum flag")

    cdef Frame f = Frame.__new__(Frame)
    f.sensor_name = f.device_name = f.encoding = EMPTY
    f.meta = None
    cdef uint64_t pos = fixed_len, start, rlen, seen = 0
    cdef uint16_t tag
    cdef uint64_t dt_off = 0, sh_off = 0, sh_len = 0
    cdef bytes blob = None
    while pos < header_len:
        if pos + 8 > header_len:
            raise FrameError(f"truncated header record at offset {pos}")
        tag = msf_ld16(b + pos)
        rlen = msf_ld32(b + pos + 4)
        start = pos + 8
        if rlen > header_len - start:
            raise FrameError(f"header record of length {rlen} at offset {pos} runs past the header end {header_len}")
        if 1 <= tag <= 6:
            if seen & (1u << tag):
                raise FrameError(f"duplicate header record {tag} at offset {pos}")
            seen |= 1u << tag
            if tag == 1:
                f.sensor_name = _utf8_field(1, b + start, rlen, "sensor_name", MAX_NAME_BYTES, start)
            elif tag == 2:
                f.device_name = _utf8_field(2, b + start, rlen, "device_name", MAX_NAME_BYTES, start)
            elif tag == 3:
                f.encoding = _utf8_field(3, b + start, rlen, "encoding", MAX_ENCODING_BYTES, start)
            elif tag == 4:
                blob = PyBytes_FromStringAndSize(<const char*>b + start, rlen)
                dt_off = start
            elif tag == 5:
                sh_off = start
                sh_len = rlen
            else:
                f.meta = S.meta_from_wire(PyBytes_FromStringAndSize(<const char*>b + start, rlen), start)
        pos = start + rlen
    if f.meta is None:
        f.meta = {}

    cdef cnp.npy_intp dims[MAX_NDIM]
    cdef int ndim, k
    cdef uint64_t nonzero, d
    cdef bint empty = False, too_big = False
    cdef int subndim = 0
    cdef cnp.dtype dt
    if flags & FLAG_NDARRAY:
        if blob is None or not (seen & (1u << 5)):
            raise FrameError("ndarray frame (flags at offset 6) without a dtype or shape record")
        entry = _dtype_entry(blob, dt_off)
        dt = entry[0]
        subndim = entry[1]
        if sh_len % 8 or sh_len // 8 > MAX_NDIM:
            raise FrameError(f"shape record of {sh_len} bytes at offset {sh_off} (ndim limit {MAX_NDIM})")
        ndim = sh_len // 8
        if ndim + subndim > MAX_NDIM:
            raise FrameError(f"shape of {ndim} dimensions at offset {sh_off} plus {subndim} from sub-array "
                             f"fields exceeds {MAX_NDIM}")
        # the rule of _schema.check_shape: the non-zero dimensions times the itemsize within
        # numpy's limit on an array's size (2**63 - 1), and all of them times it == payload_len
        nonzero = <uint64_t>dt.itemsize
        for k in range(ndim):
            d = msf_ld64(b + sh_off + 8 * k)
            dims[k] = <cnp.npy_intp>d
            if d == 0:
                empty = True
            elif d > <uint64_t>0x7FFFFFFFFFFFFFFF // nonzero:
                too_big = True
                break
            else:
                nonzero *= d
        if too_big or (0 if empty else nonzero) != plen:
            shape = []
            for k in range(ndim):
                shape.append(msf_ld64(b + sh_off + 8 * k))
            if too_big:
                raise FrameError(f"shape {shape} x itemsize {dt.itemsize} is too large for an array "
                                 f"(shape at offset {sh_off})")
            raise FrameError(f"shape {shape} x itemsize {dt.itemsize} != payload length {plen} "
                             f"(shape at offset {sh_off})")
        cnp.Py_INCREF(dt)                 # PyArray_NewFromDescr steals it
        arr = PyArray_NewFromDescr(<void*>cnp.ndarray, dt, ndim, dims, NULL,
                                       <void*>(b + poff), 0, NULL)   # flags 0: read-only
        cnp.set_array_base(arr, owner)
        if entry[2] is not None:          # text fields: numpy cannot even show a unit past U+10FFFF
            S.check_ucs4(entry[2], arr, poff)
        f.array = arr
    elif blob is not None or (seen & (1u << 5)):
        raise FrameError("dtype or shape record on a bytes frame (flags at offset 6)")
    else:
        f.array = None
    f._dtype_blob = blob
    f._owner = owner
    f._lent = True
    f._ptr = b + poff
    f._len = plen
    f.frame_id = msf_ld64(b + 40)
    f.seq = msf_ld64(b + 48)
    f.publisher_id = msf_ld64(b + 56)
    f.capture_ts_ns = <int64_t>msf_ld64(b + 64)
    f.creation_ts_ns = <int64_t>msf_ld64(b + 72)
    f.publish_ts_ns = <int64_t>msf_ld64(b + 80)
    return f


# ---------------------------------------------------------------- batch container
cdef bytes BATCH_MAGIC = S.BATCH_MAGIC
cdef Py_ssize_t BATCH_HEADER_LEN = S.BATCH_HEADER_LEN
cdef uint64_t MAX_BATCH_COUNT = S.MAX_BATCH_COUNT
cdef uint16_t BATCH_SHARED = S.BATCH_SHARED
cdef uint8_t SHARED_VERSION_MINOR = S.SHARED_VERSION_MINOR
cdef Py_ssize_t SHARED_HEAD_LEN = S.SHARED_HEAD_LEN
cdef uint64_t MAX_SHARED_TEMPLATE = S.MAX_SHARED_TEMPLATE
cdef int[4] DELTA_AT = [48, 64, 72, 80]   # seq, capture, creation, publish: an entry's differences
cdef enum:
    MIN_ENTRY = 18            # header CRC, frame id and six one-byte varints
    MAX_ENTRY = 72            # more than the most an entry takes (67): header CRC, frame id, six varints


cdef inline uint64_t _zigzag(uint64_t d) noexcept nogil:
    return (d << 1) ^ <uint64_t>(<int64_t>d >> 63)


cdef inline uint64_t _unzigzag(uint64_t z) noexcept nogil:
    return (z >> 1) ^ (0 - (z & 1))


cdef inline Py_ssize_t _put_uvarint(uint8_t* p, uint64_t v) noexcept nogil:
    cdef Py_ssize_t k = 0
    while v > 0x7F:
        p[k] = <uint8_t>((v & 0x7F) | 0x80)
        v >>= 7
        k += 1
    p[k] = <uint8_t>v
    return k + 1


cdef inline Py_ssize_t _get_uvarint(const uint8_t* b, Py_ssize_t pos, Py_ssize_t end, uint64_t* out) noexcept nogil:
    """The position after the varint at ``pos``, its value in ``out``; -1 for one that runs past
    ``end``, is longer than 10 bytes, exceeds 64 bits or is not in its shortest form."""
    cdef uint64_t v = 0
    cdef int k = 0
    cdef uint8_t c
    while True:
        if pos >= end:
            return -1
        c = b[pos]
        pos += 1
        if k == 9 and c > 1:
            return -1
        v |= (<uint64_t>(c & 0x7F)) << (7 * k)
        if not (c & 0x80):
            if k and not c:
                return -1
            out[0] = v
            return pos
        k += 1


cdef Py_ssize_t _entry_varint(const uint8_t* b, Py_ssize_t pos, Py_ssize_t end, uint64_t* out,
                              uint64_t i) except -1:
    """_get_uvarint for entry ``i``, FrameError for a bad one."""
    cdef Py_ssize_t q = _get_uvarint(b, pos, end, out)
    if q < 0:
        raise FrameError(f"bad varint in batch entry {i} at offset {pos}")
    return q


cdef inline bint _shares(const uint8_t* f, Py_ssize_t n, const uint8_t* first, Py_ssize_t t) noexcept nogil:
    """The twin's codec._shares: ``f``'s header is ``first``'s but for an entry's fields, and its
    payload length says what follows its header."""
    return (n >= t and memcmp(f, first, 12) == 0 and memcmp(f + 16, first + 16, 4) == 0
            and memcmp(f + 24, first + 24, 8) == 0 and memcmp(f + 56, first + 56, 8) == 0
            and memcmp(f + 88, first + 88, t - 88) == 0 and msf_ld64(f + 32) == <uint64_t>(n - t))


cdef list _shared_frames(const uint8_t* b, Py_ssize_t n, uint64_t count, uint64_t max_bytes):
    """codec._shared_frames: every rule of docs/wire-format.md 2b checked, with its messages,
    before any frame is made; then each frame rebuilt as its own bytes."""
    if n < SHARED_HEAD_LEN:
        raise FrameError(f"truncated shared-header batch: {n} bytes, its header needs {SHARED_HEAD_LEN} "
                         f"(at offset {n})")
    cdef uint64_t t = msf_ld16(b + 24), e = msf_ld32(b + 28)
    if t & 63 or t < 128 or t > MAX_SHARED_TEMPLATE:
        raise FrameError(f"shared header length {t} at offset 24 is not a multiple of 64 in "
                         f"[128, {MAX_SHARED_TEMPLATE}]")
    cdef uint64_t body = <uint64_t>SHARED_HEAD_LEN + t + e
    if body > <uint64_t>n:
        raise FrameError(f"shared header and entries ({t} + {e} bytes, at offset 24) run past the {n}-byte message")
    if msf_crc32c(msf_crc32c(0, b, 12), b + 16, body - 16) != msf_ld32(b + 12):
        raise FrameError("batch header CRC32C mismatch at offset 12")
    cdef uint64_t total = msf_ld64(b + 16)
    if total != <uint64_t>n:
        raise FrameError(f"batch total {total} at offset 16 differs from the message length {n}")
    if (count - 1) * MIN_ENTRY > e:
        raise FrameError(f"batch count {count} at offset 8 needs at least {(count - 1) * MIN_ENTRY} bytes of "
                         f"entries, not {e}")
    cdef const uint8_t* tp = b + SHARED_HEAD_LEN
    if memcmp(tp, <const char*>MAGIC, 4) != 0:
        raise FrameError(f"batch template at offset {SHARED_HEAD_LEN} is not a frame header (magic "
                         f"{PyBytes_FromStringAndSize(<const char*>tp, 4)!r})")
    cdef uint64_t poff = msf_ld64(tp + 24), plen = msf_ld64(tp + 32)
    if poff != t:
        raise FrameError(f"template payload offset {poff} at offset {SHARED_HEAD_LEN + 24} differs from the shared "
                         f"header length {t}")
    cdef uint64_t avail = <uint64_t>n - body
    if count * t + avail > max_bytes:           # the frames' total, exact once the rules below pass
        raise FrameError(f"batch of {count} frames would rebuild to {count * t + avail} bytes, over the "
                         f"limit of {max_bytes}")
    if plen > avail:
        raise FrameError(f"frame 0's payload of {plen} bytes (length at offset {SHARED_HEAD_LEN + 32}) runs past "
                         "the message")
    cdef uint64_t used = plen, i, ln, z, pcrc
    cdef uint64_t seq = msf_ld64(tp + 48), cap = msf_ld64(tp + 64), cre = msf_ld64(tp + 72), pub = msf_ld64(tp + 80)
    cdef Py_ssize_t pos = SHARED_HEAD_LEN + t, start, at
    # (count - 1) * 8 words: at most 64 / MIN_ENTRY times the entries' bytes, checked above
    cdef uint64_t* ent = <uint64_t*>PyMem_Malloc(sizeof(uint64_t) * 8 * (count - 1) + 1)
    if ent == NULL:
        raise MemoryError()
    cdef uint64_t* en
    cdef list out
    cdef uint8_t* o
    try:
        for i in range(1, count):
            start = pos
            if <uint64_t>pos + 12 > body:
                raise FrameError(f"batch entry {i} at offset {pos} runs past the entries' end {body}")
            en = ent + 8 * (i - 1)
            en[0] = msf_ld32(b + pos)
            en[3] = msf_ld64(b + pos + 4)
            pos += 12
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &ln, i)
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &z, i)
            seq += _unzigzag(z)
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &z, i)
            cap += _unzigzag(z)
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &z, i)
            cre += _unzigzag(z)
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &z, i)
            pub += _unzigzag(z)
            at = pos
            pos = _entry_varint(b, pos, <Py_ssize_t>body, &pcrc, i)
            if pcrc > 0xFFFFFFFF:
                raise FrameError(f"payload CRC {pcrc} in batch entry {i} at offset {at} exceeds 32 bits")
            if ln > avail - used:
                raise FrameError(f"batch entry {i}'s payload of {ln} bytes runs past the message (entry at "
                                 f"offset {start})")
            used += ln
            en[1], en[2], en[4], en[5], en[6], en[7] = pcrc, ln, seq, cap, cre, pub
        if <uint64_t>pos != body:
            raise FrameError(f"{body - pos} bytes after the last batch entry (at offset {pos})")
        if used != avail:
            raise FrameError(f"{avail - used} bytes after the last payload (at offset {body + used})")
        out = []
        f = PyBytes_FromStringAndSize(NULL, t + plen)
        o = <uint8_t*>PyBytes_AS_STRING(f)
        memcpy(o, tp, t)
        memcpy(o + t, b + body, plen)
        out.append(f)
        at = body + plen
        for i in range(count - 1):
            en = ent + 8 * i
            ln = en[2]
            f = PyBytes_FromStringAndSize(NULL, t + ln)
            o = <uint8_t*>PyBytes_AS_STRING(f)
            memcpy(o, tp, t)
            msf_st32(o + 12, <uint32_t>en[0])
            msf_st32(o + 20, <uint32_t>en[1])
            msf_st64(o + 32, ln)
            msf_st64(o + 40, en[3])
            msf_st64(o + 48, en[4])
            msf_st64(o + 64, en[5])
            msf_st64(o + 72, en[6])
            msf_st64(o + 80, en[7])
            memcpy(o + t, b + at, ln)
            at += ln
            out.append(f)
        return out
    finally:
        PyMem_Free(ent)


def batch_frames(buf, *, max_bytes=None):
    """The frames of a batch container (docs/wire-format.md 2a), each copied into a bytes of its
    own (a frame kept does not keep the container alive), or, for a shared-header batch (2b),
    each rebuilt into one. Every rule of the container is checked before anything is returned,
    with the twin's FrameError messages (codec.batch_spans, codec._shared_frames); the frames'
    own headers are left to ``decode``. Nothing is read outside ``buf``. ``max_bytes`` bounds what
    a shared-header batch rebuilds to (its frames' total; a whole-frame batch's is under its own
    length): FrameError above it, before anything is made."""
    cdef const uint8_t* b
    cdef Py_ssize_t n
    owner = _pin(buf, &b, &n)
    if n < BATCH_HEADER_LEN:
        raise FrameError(f"truncated batch: {n} bytes, its header needs {BATCH_HEADER_LEN} (at offset {n})")
    if memcmp(b, <const char*>BATCH_MAGIC, 4) != 0:
        raise FrameError(f"bad batch magic {PyBytes_FromStringAndSize(<const char*>b, 4)!r} at offset 0 "
                         f"(expected {BATCH_MAGIC!r})")
    if b[4] != 1:
        raise FrameError(f"unsupported batch major version {b[4]} at offset 4 (this reader knows 1)")
    cdef uint64_t count = msf_ld32(b + 8)
    if count < 1 or count > MAX_BATCH_COUNT:
        raise FrameError(f"batch count {count} at offset 8 out of range [1, {MAX_BATCH_COUNT}]")
    if msf_ld16(b + 6) & BATCH_SHARED:
        limit = 0xFFFFFFFFFFFFFFFF if max_bytes is None else min(max(0, max_bytes), 0xFFFFFFFFFFFFFFFF)
        return _shared_frames(b, n, count, limit)
    cdef uint64_t index_end = BATCH_HEADER_LEN + 4 * count
    if index_end > <uint64_t>n:
        raise FrameError(f"batch index of {count} lengths runs past the {n}-byte message "
                         f"(at offset {BATCH_HEADER_LEN})")
    if msf_crc32c(msf_crc32c(0, b, 12), b + 16, index_end - 16) != msf_ld32(b + 12):
        raise FrameError("batch header CRC32C mismatch at offset 12")
    cdef uint64_t total = msf_ld64(b + 16)
    if total != <uint64_t>n:
        raise FrameError(f"batch total {total} at offset 16 differs from the message length {n}")
    cdef uint64_t pos = (index_end + 7) & ~(<uint64_t>7), i, j, ln, end, nxt
    if pos > <uint64_t>n:
        raise FrameError(f"batch padding at offset {index_end} is truncated or not zero")
    for j in range(index_end, pos):
        if b[j]:
            raise FrameError(f"batch padding at offset {index_end} is truncated or not zero")
    cdef list out = []
    for i in range(count):
        ln = msf_ld32(b + BATCH_HEADER_LEN + 4 * i)
        end = pos + ln
        nxt = (end + 7) & ~(<uint64_t>7)
        if ln < FIXED_LEN or nxt > <uint64_t>n:
            raise FrameError(f"batch frame {i} of {ln} bytes at offset {pos} (length at offset "
                             f"{BATCH_HEADER_LEN + 4 * i}) is shorter than a frame header or runs past the message")
        if memcmp(b + pos, <const char*>MAGIC, 4) != 0:
            raise FrameError(f"batch frame {i} at offset {pos} is not a frame (magic "
                             f"{PyBytes_FromStringAndSize(<const char*>b + pos, 4)!r}): a batch holds whole frames only")
        for j in range(end, nxt):
            if b[j]:
                raise FrameError(f"non-zero batch padding after frame {i}, at offset {end}")
        out.append(PyBytes_FromStringAndSize(<const char*>b + pos, ln))
        pos = nxt
    if pos != <uint64_t>n:
        raise FrameError(f"{n - pos} bytes after the last batch frame (at offset {pos})")
    return out


cdef class BatchWriter:
    """Frames gathered for one batch container, the compiled twin of ``codec._BatchWriter``. Each
    frame is copied when added, so the caller's buffers are free again once ``add`` returns;
    ``pack`` copies them once more, into the container. ``count`` and ``size`` (the length of the
    container ``pack`` would make now) are plain attributes: a producer reads them per frame."""

    cdef uint8_t* _buf            # the frames, each followed by its padding to a multiple of 8
    cdef Py_ssize_t _cap
    cdef uint32_t* _lens
    cdef Py_ssize_t _lcap
    # read-only from Python: pack, frames and first trust them to describe the buffers
    cdef readonly Py_ssize_t body   # bytes of the frames and their padding
    cdef readonly Py_ssize_t count
    cdef readonly Py_ssize_t size
    cdef public bint shared         # pack a shared-header batch (2b) when the frames allow it
    cdef Py_ssize_t _t              # the shared header's length while the frames share it, else 0

    def __cinit__(self):
        self._buf = NULL
        self._lens = NULL
        self._cap = self._lcap = 0
        self.body = self.count = 0
        self.size = (BATCH_HEADER_LEN + 7) & ~7
        self.shared = False
        self._t = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._lens)

    cdef int _room(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap
        cdef uint8_t* p
        if need > self._cap:
            cap = max(need, 2 * self._cap, 4096)
            p = <uint8_t*>PyMem_Realloc(self._buf, cap)
            if p == NULL:
                raise MemoryError()
            self._buf, self._cap = p, cap
        return 0

    def clear(self):
        """Empty again, keeping the buffers grown so far (the next batch of a steady stream needs
        no growing, and no fresh pages)."""
        self.body = self.count = 0
        self.size = (BATCH_HEADER_LEN + 7) & ~7
        self._t = 0

    def size_with(self, nbytes):
        """The container's length with one more frame of ``nbytes``."""
        # nbytes a Python int: no overflow, whatever the caller passes (as in the twin)
        return ((BATCH_HEADER_LEN + 11 + 4 * self.count) & ~7) + self.body + ((nbytes + 7) & -8)

    def add(self, parts):
        """Add one encoded frame (its ``encode_parts`` list, or its bytes as a one-item list);
        returns the container's new ``size``."""
        if self.count >= <Py_ssize_t>MAX_BATCH_COUNT:
            raise ValueError(f"a batch holds at most {MAX_BATCH_COUNT} frames")
        cdef Py_ssize_t start = self.body, n = 0
        cdef Py_buffer v
        for part in parts:
            PyObject_GetBuffer(part, &v, PyBUF_SIMPLE)
            try:
                self._room(start + n + v.len + 8)
                memcpy(self._buf + start + n, v.buf, v.len)
                n += v.len
            finally:
                PyBuffer_Release(&v)
        if n < FIXED_LEN or memcmp(self._buf + start, <const char*>MAGIC, 4) != 0:
            raise ValueError("not an encoded frame (a batch holds whole frames only)")
        return self._append(n)

    def stamp_add(self, Frame frame not None, seq, publisher_id, bint checksum, Py_ssize_t cap, Py_ssize_t limit):
        """``add(stamp_parts(frame, seq, publisher_id, checksum))`` in one call, when the encoded
        frame is at most ``cap`` bytes, the container with it at most ``limit`` and the batch not
        full; returns the new ``size``, or 0 with nothing added (the frame is stamped either way)."""
        cdef uint64_t s = PyNumber_Index(seq), p = PyNumber_Index(publisher_id)
        return self._stamp_add(frame, s, p, checksum, cap, limit)

    cdef Py_ssize_t _stamp_add(self, Frame frame, uint64_t s, uint64_t p, bint checksum, Py_ssize_t cap,
                               Py_ssize_t limit) except -1:
        frame.seq = s
        frame.publisher_id = p
        frame.publish_ts_ns = _now_ns()
        cdef _Hdr h
        keep = _plan(frame, checksum, &h)
        cdef Py_ssize_t n = h.offset + frame._len, start = self.body
        if (n > cap or self.count >= <Py_ssize_t>MAX_BATCH_COUNT
                or ((BATCH_HEADER_LEN + 11 + 4 * self.count) & ~7) + start + ((n + 7) & ~7) > limit):
            return 0
        self._room(start + n + 8)
        _fill(frame, &h, self._buf + start)      # the header straight into the batch: no bytes between
        if frame._len:
            memcpy(self._buf + start + h.offset, frame._ptr, frame._len)
        return self._append(n)

    cdef Py_ssize_t _append(self, Py_ssize_t n) except -1:
        """Take the ``n`` bytes just copied at ``body`` (a whole frame, ``_room`` made for its
        padding) as the next frame; returns the new ``size``."""
        cdef Py_ssize_t start = self.body, pad
        cdef uint32_t* lens
        if n > 0xFFFFFFFF:
            raise ValueError(f"a frame of {n} bytes does not fit a batch's 32-bit length")
        cdef uint64_t t
        if not self.count:
            t = msf_ld64(self._buf + 24)
            self._t = <Py_ssize_t>t if (128 <= t <= MAX_SHARED_TEMPLATE and not (t & 63) and t <= <uint64_t>n
                                        and msf_ld64(self._buf + 32) == <uint64_t>n - t) else 0
        elif self._t and not _shares(self._buf + start, n, self._buf, self._t):
            self._t = 0
        if self.count == self._lcap:
            lens = <uint32_t*>PyMem_Realloc(self._lens, sizeof(uint32_t) * max(64, 2 * self._lcap))
            if lens == NULL:
                raise MemoryError()
            self._lens, self._lcap = lens, max(64, 2 * self._lcap)
        pad = -n & 7
        memset(self._buf + start + n, 0, pad)            # _room left 8 bytes for it
        self._lens[self.count] = <uint32_t>n
        self.body = start + n + pad
        self.count += 1
        self.size = ((BATCH_HEADER_LEN + 7 + 4 * self.count) & ~7) + self.body
        return self.size

    @property
    def lengths(self):
        """The lengths of the frames added, in order."""
        return [self._lens[i] for i in range(self.count)]

    def frames(self):
        """The frames added, in order, without their padding."""
        cdef list out = []
        cdef Py_ssize_t pos = 0, i
        for i in range(self.count):
            out.append(PyBytes_FromStringAndSize(<const char*>self._buf + pos, self._lens[i]))
            pos += (<Py_ssize_t>self._lens[i] + 7) & ~7
        return out

    def first(self):
        """The first frame added (a batch of one goes out as that frame alone)."""
        if not self.count:
            raise ValueError("an empty batch has no first frame")
        return PyBytes_FromStringAndSize(<const char*>self._buf, self._lens[0])

    def pack(self):
        """The container: shared-header (docs/wire-format.md 2b) when ``shared`` is set and the
        frames allow it, else header, index, padding and the frames (2a); one copy."""
        if not self.count:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH_COUNT} frames, not 0")
        if self.shared and self._t and self.count > 1:
            return self._pack_shared()
        cdef Py_ssize_t index_end = BATCH_HEADER_LEN + 4 * self.count, pos = (index_end + 7) & ~7, i
        out = PyBytes_FromStringAndSize(NULL, self.size)
        cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(o, <const char*>BATCH_MAGIC, 4)
        o[4] = 1
        o[5] = 0
        msf_st16(o + 6, 0)
        msf_st32(o + 8, <uint32_t>self.count)
        msf_st64(o + 16, <uint64_t>self.size)
        for i in range(self.count):
            msf_st32(o + BATCH_HEADER_LEN + 4 * i, self._lens[i])
        memset(o + index_end, 0, pos - index_end)
        msf_st32(o + 12, msf_crc32c(msf_crc32c(0, o, 12), o + 16, index_end - 16))
        memcpy(o + pos, self._buf, self.body)
        return out

    cdef bytes _pack_shared(self):
        cdef Py_ssize_t t = self._t, count = self.count, i, pos, e = 0, plsum, ln, q
        cdef const uint8_t* first = self._buf
        cdef const uint8_t* f
        cdef uint64_t prev[4]
        cdef uint64_t v
        cdef int k
        for k in range(4):
            prev[k] = msf_ld64(first + DELTA_AT[k])
        cdef bytes out
        cdef uint8_t* o
        cdef uint8_t* ent = <uint8_t*>PyMem_Malloc(MAX_ENTRY * (count - 1))
        if ent == NULL:
            raise MemoryError()
        try:
            plsum = <Py_ssize_t>self._lens[0] - t
            pos = (<Py_ssize_t>self._lens[0] + 7) & ~7
            for i in range(1, count):
                f = self._buf + pos
                ln = <Py_ssize_t>self._lens[i]
                memcpy(ent + e, f + 12, 4)
                memcpy(ent + e + 4, f + 40, 8)
                e += 12
                e += _put_uvarint(ent + e, <uint64_t>(ln - t))
                for k in range(4):                 # seq and the three times, each from the last frame's
                    v = msf_ld64(f + DELTA_AT[k])
                    e += _put_uvarint(ent + e, _zigzag(v - prev[k]))
                    prev[k] = v
                e += _put_uvarint(ent + e, msf_ld32(f + 20))
                plsum += ln - t
                pos += (ln + 7) & ~7
            out = PyBytes_FromStringAndSize(NULL, SHARED_HEAD_LEN + t + e + plsum)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            memcpy(o, <const char*>BATCH_MAGIC, 4)
            o[4] = 1
            o[5] = SHARED_VERSION_MINOR
            msf_st16(o + 6, BATCH_SHARED)
            msf_st32(o + 8, <uint32_t>count)
            msf_st64(o + 16, <uint64_t>(SHARED_HEAD_LEN + t + e + plsum))
            msf_st16(o + 24, <uint16_t>t)
            msf_st16(o + 26, 0)
            msf_st32(o + 28, <uint32_t>e)
            memcpy(o + SHARED_HEAD_LEN, first, t)
            memcpy(o + SHARED_HEAD_LEN + t, ent, e)
            msf_st32(o + 12, msf_crc32c(msf_crc32c(0, o, 12), o + 16, SHARED_HEAD_LEN + t + e - 16))
            q = SHARED_HEAD_LEN + t + e
            pos = 0
            for i in range(count):
                ln = <Py_ssize_t>self._lens[i]
                memcpy(o + q, self._buf + pos + t, ln - t)
                q += ln - t
                pos += (ln + 7) & ~7
            return out
        finally:
            PyMem_Free(ent)


# ---------------------------------------------------------------- fragment header
def pack_fragment_header(uint64_t frame_id, uint64_t publisher_id, uint32_t index, uint32_t count,
                         uint64_t total, uint64_t offset, uint32_t chunk_size, chunk, uint32_t sending=0):
    """The 64-byte header of one fragment; its CRC32C covers bytes 0..60 and then ``chunk``.

    ``chunk`` may be a list or tuple of bytes-like pieces that together make the chunk, so a
    fragment can be gathered from a frame's parts without joining them first. ``sending`` is
    the frame's header CRC, which tells two sendings of one frame id apart."""
    cdef const uint8_t* p
    cdef Py_ssize_t n, k
    cdef list pins = []
    if type(chunk) is list or type(chunk) is tuple:
        n = 0
        for piece in chunk:
            pins.append(_pin(piece, &p, &k))
            n += k
    else:
        pins.append(_pin(chunk, &p, &n))
    out = PyBytes_FromStringAndSize(NULL, FRAG_HEADER_LEN)
    cdef uint8_t* h = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(h, <const char*>FRAG_MAGIC, 4)
    h[4] = 1
    h[5] = FRAG_VERSION_MINOR
    msf_st16(h + 6, 0)
    msf_st64(h + 8, frame_id)
    msf_st64(h + 16, publisher_id)
    msf_st32(h + 24, index)
    msf_st32(h + 28, count)
    msf_st64(h + 32, total)
    msf_st64(h + 40, offset)
    msf_st32(h + 48, chunk_size)
    msf_st32(h + 52, <uint32_t>n)
    msf_st32(h + 56, sending)
    cdef uint32_t crc = msf_crc32c(0, h, 60)
    for piece in pins:
        _pin(piece, &p, &k)
        crc = _crc(crc, p, k)
    msf_st32(h + 60, crc)
    return out


def parse_fragment_header(buf):
    """Validate one fragment; returns (frame_id, publisher_id, index, count, total, offset,
    chunk_size, sending, chunk)."""
    cdef const uint8_t* b
    cdef Py_ssize_t n
    owner = _pin(buf, &b, &n)
    if n < FRAG_HEADER_LEN:
        raise FrameError(f"truncated fragment: {n} bytes, its header needs {FRAG_HEADER_LEN} (at offset {n})")
    if memcmp(b, <const char*>FRAG_MAGIC, 4) != 0:
        raise FrameError(f"bad fragment magic {(<const char*>b)[:4]!r} at offset 0")
    if b[4] != 1:
        raise FrameError(f"unsupported fragment major version {b[4]} at offset 4")
    cdef uint32_t clen = msf_ld32(b + 52)
    if <Py_ssize_t>clen != n - FRAG_HEADER_LEN:
        raise FrameError(f"fragment chunk length {clen} at offset 52 != {n - FRAG_HEADER_LEN} bytes present")
    if _crc(msf_crc32c(0, b, 60), b + FRAG_HEADER_LEN, clen) != msf_ld32(b + 60):
        raise FrameError("fragment CRC32C mismatch at offset 60")
    return (msf_ld64(b + 8), msf_ld64(b + 16), msf_ld32(b + 24), msf_ld32(b + 28), msf_ld64(b + 32),
            msf_ld64(b + 40), msf_ld32(b + 48), msf_ld32(b + 56), _view_of(owner, b + FRAG_HEADER_LEN, clen))


@cython.final
cdef class SmallLane:
    """``Bus.publish``'s common case on a batching transport (Kafka), in one call: a small bytes or
    ndarray payload made a frame, numbered, and stamped straight into its topic's open batch
    (``BatchWriter.stamp_add``), with both locks taken only if they are free.

    Returns the frame it published. Otherwise nothing is done (no number taken, nothing added), and
    it returns None, or ``(frame,)`` when it had built the frame: a Frame given, a payload of
    ``small`` bytes or more, a closed Bus, no open batch, a new key or topic, a broken producer, a
    busy lock, a frame the batch has no room for, or any error. ``Bus.publish`` then goes its usual
    way (with the frame built, if any), where the rules are, and raises what it always raised. A
    batch this fills goes out here (``send``), as ``add_small`` sends it.

    Per call it reads the Bus's ``_closed`` and ``config.checksum`` and the transport's
    ``_last_key`` and ``_broken``, and adds to the Bus's ``published``."""
    cdef object _bus, _t, _cfg, _pid_o, _send
    cdef object _lock_acquire, _lock_release, _blk_acquire, _blk_release
    cdef dict _seqs, _limits, _batches
    cdef uint64_t _pid
    cdef Py_ssize_t _small, _cap, _batch_max, _min_frame

    def __init__(self, bus, transport, *, dict limits not None, dict batches not None, blk, send,
                 Py_ssize_t cap, Py_ssize_t batch_max, Py_ssize_t min_frame):
        if self._bus is not None:
            raise TypeError("a SmallLane is initialised once")
        self._bus, self._t, self._cfg = bus, transport, bus.config
        self._lock_acquire, self._lock_release = bus._lock.acquire, bus._lock.release
        self._seqs = bus._seq
        self._pid_o = bus.publisher_id
        self._pid = PyNumber_Index(bus.publisher_id)
        self._small = bus._small
        self._limits, self._batches, self._send = limits, batches, send
        self._blk_acquire, self._blk_release = blk.acquire, blk.release
        self._cap, self._batch_max, self._min_frame = cap, batch_max, min_frame

    def __call__(self, topic, obj, dict fields not None):
        cdef Py_ssize_t n
        if type(topic) is not str or not topic:
            return None
        if type(obj) is bytes:
            n = PyBytes_GET_SIZE(obj)
        elif isinstance(obj, cnp.ndarray):
            n = cnp.PyArray_NBYTES(<cnp.ndarray>obj)
        else:
            return None
        if n >= self._small or self._bus._closed or not self._lock_acquire(False):
            return None
        try:
            got = self._add(<str>topic, obj, fields)
            if type(got) is Frame:
                self._bus.published += 1
        except MsightFastError as e:                        # a full batch's send, as the usual way
            err = self._bus._failed(e)
        else:
            return got
        finally:
            self._lock_release()
        raise err from None

    cdef object _add(self, str topic, obj, dict fields):
        """With the Bus's lock held: the frame, taken into the open batch; ``(frame,)``, built
        and not taken; or None, with nothing built."""
        t = self._t
        limit = self._limits.get(topic)
        if limit is None or t._broken is not None:
            return None
        last = t._last_key
        if last[0] != self._pid_o or not self._blk_acquire(False):
            return None
        cdef Py_ssize_t lim, size
        cdef uint64_t seq
        cdef Frame f
        try:
            b = self._batches.get((topic, -1))
            if b is None or b.key != last[1]:
                return None
            # built once a batch is known to be open for it, so the first frame of a batch is not
            # built here only to be built again; a field it refuses, the usual way refuses again
            try:
                f = _frame_for(obj, topic, fields)
            except Exception:
                return None
            lim = min(<Py_ssize_t>limit, self._batch_max)
            seq_o = self._seqs.get(topic, 0) + 1
            try:
                seq = seq_o
                size = (<BatchWriter?>b)._stamp_add(f, seq, self._pid, self._cfg.checksum, self._cap, lim)
            except Exception:
                return (f,)                                 # the usual way raises it again
            if not size:
                return (f,)
            if size + self._min_frame > lim or (<BatchWriter>b).count >= <Py_ssize_t>MAX_BATCH_COUNT:
                try:                                        # full: out now
                    self._send(b, _monotonic() + self._cfg.publish_timeout_s)
                except BackendUnavailable:
                    pass                                    # the frame is in; the batch goes once there is room
            self._seqs[topic] = seq_o                       # a refused frame leaves no gap behind
            return f
        finally:
            self._blk_release()


# ---------------------------------------------------------------- per-frame accounting
cdef class Tally:
    """What a Subscription counts of each frame it hands over, in one call: the compiled twin of
    ``stats.PyTally``. The common case, the same publisher's next number, stays here (the
    tracker's entry for that publisher is brought up to date by ``sync``), and the latency goes
    straight into the window's ring (its count, too, by ``sync``). Anything else goes to the
    tracker as it is: its rules live there only."""

    cdef readonly uint64_t received
    cdef readonly uint64_t nbytes
    cdef readonly object tracker
    cdef readonly object window
    cdef object _clock
    cdef bint _wall                # _clock is time.time_ns: read in C
    cdef object _ring              # the window's array, kept alive while _lat points into it
    cdef Py_buffer _view
    cdef int64_t* _lat
    cdef Py_ssize_t _n
    cdef Py_ssize_t _i             # the window's count, written back by sync
    cdef object _hot               # the tracker's entry of the publisher seen last, or None
    cdef uint64_t _hot_pid
    cdef uint64_t _hot_high        # that entry's highest number, ahead of it until sync
    cdef bint _dirty

    def __cinit__(self):
        self._lat = NULL

    def __init__(self, tracker, window, clock):
        if self._lat != NULL:
            raise TypeError("a Tally is initialised once")
        ring = window._a
        cdef Py_ssize_t n = window._n
        if n <= 0:
            raise ValueError(f"a latency window of {n} entries")
        PyObject_GetBuffer(ring, &self._view, PyBUF_WRITABLE)
        if self._view.len < 8 * n:
            PyBuffer_Release(&self._view)
            raise ValueError("the latency window's ring is shorter than its length")
        self._ring = ring
        self._lat = <int64_t*>self._view.buf
        self._n = n
        self._i = window._i
        self.tracker, self.window, self._clock = tracker, window, clock
        self._wall = clock is _time_ns
        self.received = self.nbytes = 0
        self._hot = None
        self._dirty = False

    def __dealloc__(self):
        if self._lat != NULL:
            PyBuffer_Release(&self._view)

    def took(self, Frame frame not None):
        """Count ``frame``, a whole frame handed over now."""
        self._took(frame)

    cdef int _took(self, Frame frame) except -1:
        self.received += 1
        self.nbytes += <uint64_t>frame._len
        cdef int64_t ts = frame.publish_ts_ns, now
        cdef bint fits = True
        if ts:
            if self._wall:
                now = _now_ns()
            else:
                now_o = self._clock()
                try:
                    now = now_o
                except OverflowError:          # a clock past i64: the window's own rule decides
                    fits = False
                    self.window._i = self._i
                    self.window.add(now_o - ts)
                    self._i = self.window._i
            if fits:
                # the latency when it is an i64, as the window takes it (a forged time is dropped)
                if not ((ts < 0 and now > INT64_MAX + ts) or (ts > 0 and now < INT64_MIN + ts)):
                    self._lat[self._i % self._n] = now - ts
                    self._i += 1
        cdef uint64_t pid = frame.publisher_id, seq = frame.seq
        if pid:
            if (self._hot is not None and pid == self._hot_pid and self._hot_high != <uint64_t>0xFFFFFFFFFFFFFFFF
                    and seq == self._hot_high + 1):
                self._hot_high = seq
                self._dirty = True
                return 0
            self._sync_seq()
            self.tracker.see(pid, seq)
            hot = self.tracker._hot
            if hot is None:
                self._hot = None
            else:
                self._hot_pid = self.tracker._hot_pub
                self._hot_high = hot.high
                self._hot = hot
        return 0

    def took_bytes(self, nbytes):
        """Count a message handed over as it came (not a frame: no latency, no sequence)."""
        self.received += 1
        self.nbytes += <uint64_t>nbytes

    cdef int _sync_seq(self) except -1:
        if self._dirty:
            self._dirty = False
            self._hot.high = self._hot_high
        return 0

    def sync(self):
        """Bring ``tracker`` and ``window`` up to date."""
        if self.window._a is not self._ring:       # its ring is what the latencies went into
            raise RuntimeError("the latency window's ring was replaced under its Tally")
        self._sync_seq()
        self.window._i = self._i


@cython.final
cdef class BatchCursor:
    """A source's decoded batch, handed on frame by frame: ``frames`` and the index ``i`` of the
    next. The twin is a plain object with the same two attributes."""
    cdef public list frames
    cdef public Py_ssize_t i

    def __init__(self):
        self.frames = []
        self.i = 0


@cython.final
cdef class RecvLane:
    """``Subscription.recv``'s common case on Kafka, in one call: the next frame of a batch the
    source decoded, counted (``Tally``) and handed over, with the Subscription's lock taken only if
    it is free. None, with nothing taken, otherwise: a busy lock, a closed Subscription, tokens
    held, a rebalance to apply, no batch, or its last frame (which carries the batch's token, for
    the usual way to hand). ``recv`` then goes its usual way.

    Per call it reads the Subscription's ``_closed`` and ``_tokens`` and the source's ``_gen`` and
    ``_local_gen``."""
    cdef object _sub, _src, _acquire, _release
    cdef Tally _tally
    cdef BatchCursor _cur

    def __init__(self, sub, source, BatchCursor cursor not None):
        if self._sub is not None:
            raise TypeError("a RecvLane is initialised once")
        self._tally = <Tally?>sub._tally
        self._sub, self._src, self._cur = sub, source, cursor
        self._acquire, self._release = sub._rlock.acquire, sub._rlock.release

    def __call__(self):
        cdef BatchCursor c = self._cur
        cdef Py_ssize_t i = c.i
        if i + 1 >= len(c.frames) or not self._acquire(False):
            return None
        try:
            sub, src = self._sub, self._src
            if sub._closed or sub._tokens or src._local_gen != src._gen:
                return None
            i = c.i                                 # as it is now the lock is held
            if i + 1 >= len(c.frames):
                return None
            f = c.frames[i]
            if type(f) is not Frame:                # a frame left as bytes: the usual way rejects it
                return None
            c.i = i + 1
            self._tally._took(<Frame>f)
            return f
        finally:
            self._release()
