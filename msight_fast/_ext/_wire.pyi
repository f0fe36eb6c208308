from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

HARDWARE_CRC32C: bool
MetaValue = Union[str, int, float]

class Frame:
    @property
    def array(self) -> Optional[np.ndarray]: ...
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
    meta: Dict[str, MetaValue]
    def __init__(self) -> None: ...
    @classmethod
    def from_array(cls, arr: np.ndarray, *, sensor_name: str, encoding: Optional[str] = ...,
                   device_name: Optional[str] = ..., frame_id: Optional[int] = ...,
                   capture_ts_ns: Optional[int] = ..., meta: Optional[Mapping[str, MetaValue]] = ...) -> Frame: ...
    @classmethod
    def from_bytes(cls, data: Any, *, sensor_name: str, encoding: str, device_name: Optional[str] = ...,
                   frame_id: Optional[int] = ..., capture_ts_ns: Optional[int] = ...,
                   meta: Optional[Mapping[str, MetaValue]] = ...) -> Frame: ...

def crc32c(data: Any, crc: int = ...) -> int: ...
def encode(frame: Frame, *, checksum: bool = ...) -> bytes: ...
def encode_parts(frame: Frame, *, checksum: bool = ...) -> List[Union[bytes, memoryview]]: ...
def decode(buf: Any) -> Frame: ...
def pack_fragment_header(frame_id: int, publisher_id: int, index: int, count: int, total: int,
                         offset: int, chunk_size: int, chunk: Any) -> bytes: ...
def parse_fragment_header(buf: Any) -> Tuple[int, int, int, int, int, int, int, memoryview]: ...
