"""An MSight-Core-style codec, written here from its description (baselines.md): a msgpack map of
metadata plus ``arr.tobytes()``; point clouds zstd level 3 with a new compressor per frame and the
dtype as JSON; decode = unpack (+ decompress) + ``np.frombuffer`` + reshape."""
from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import zstandard


def encode(payload, sensor_name="cam", encoding="bgr8") -> bytes:
    d = {"sensor_name": sensor_name, "frame_id": time.time_ns(), "creation_timestamp": time.time(),
         "capture_timestamp": time.time(), "data_type": "msight_core.data.ImageData", "encoding": encoding}
    if isinstance(payload, np.ndarray):
        if payload.dtype.names:
            d["points"] = zstandard.ZstdCompressor(level=3).compress(payload.tobytes())
            d["dtype"] = json.dumps(payload.dtype.descr)
            d["n"] = len(payload)
        else:
            d["image"] = payload.tobytes()
            d["shape"] = list(payload.shape)
            d["dtype"] = payload.dtype.str
    else:
        d["image"] = bytes(payload)
    return msgpack.packb(d, use_bin_type=True)


def decode(buf):
    d = msgpack.unpackb(buf, raw=False)
    if "points" in d:
        raw = zstandard.ZstdDecompressor().decompress(d["points"])
        dt = np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2])) for f in json.loads(d["dtype"])])
        return np.frombuffer(raw, dtype=dt)
    if "shape" in d:
        return np.frombuffer(d["image"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
    return np.frombuffer(d["image"], dtype=np.uint8)
