# The typed surface of the codec: the compiled core (_wire.pyx) provides every name here, the
# pure-Python twin (msight_fast/_pywire.py) the public ones (Frame, encode, encode_parts, decode,
# crc32c, the fragment header functions); msight_fast.codec re-exports those.
from collections.abc import Mapping, Sequence

import numpy as np
from typing_extensions import Buffer, TypeAlias

HARDWARE_CRC32C: bool
DTYPE_CACHE_MAX_ENTRIES: int
DTYPE_CACHE_MAX_BYTES: int
MetaValue: TypeAlias = str | int | float
# any contiguous buffer; ndarray is named since numpy declares __buffer__ only on Python >= 3.12
BufferLike: TypeAlias = Buffer | np.ndarray

class Frame:
    @property
    def array(self) -> np.ndarray | None: ...
    @property
    def data(self) -> memoryview: ...
    @property
    def nbytes(self) -> int: ...
    encoding: str
    sensor_name: str
    device_name: str
    frame_id: int
    seq: int
    publisher_id: int
    capture_ts_ns: int
    creation_ts_ns: int
    publish_ts_ns: int
    meta: dict[str, MetaValue]
    def __init__(self) -> None: ...
    @classmethod
    def from_array(cls, arr: np.ndarray, *, sensor_name: str, encoding: str | None = ...,
                   device_name: str | None = ..., frame_id: int | None = ...,
                   capture_ts_ns: int | None = ..., meta: Mapping[str, MetaValue] | None = ...) -> Frame: ...
    @classmethod
    def from_bytes(cls, data: BufferLike, *, sensor_name: str, encoding: str, device_name: str | None = ...,
                   frame_id: int | None = ..., capture_ts_ns: int | None = ...,
                   meta: Mapping[str, MetaValue] | None = ...) -> Frame: ...

def crc32c(data: BufferLike, crc: int = ...) -> int: ...
def _crc32c_software(data: BufferLike, crc: int = ...) -> int: ...
def _dtype_cache_bytes() -> int: ...
def encode(frame: Frame, *, checksum: bool = ...) -> bytes: ...
def encode_parts(frame: Frame, *, checksum: bool = ...) -> list[bytes | memoryview]: ...
def decode(buf: BufferLike) -> Frame: ...
def pack_fragment_header(frame_id: int, publisher_id: int, index: int, count: int, total: int,
                         offset: int, chunk_size: int,
                         chunk: BufferLike | Sequence[BufferLike]) -> bytes: ...
def parse_fragment_header(buf: BufferLike) -> tuple[int, int, int, int, int, int, int, memoryview]: ...
