"""Codec benchmarks (pytest-benchmark): msight_fast against the one-copy floor, pickle 5 and an
MSight-Core-style msgpack codec, all in the same run. ``python benchmarks/table.py`` prints the table.

    bash ci/bench.sh codec
"""
import pickle

import numpy as np
import pytest

from msight_fast import _pywire
from msight_fast._impl import HAS_EXTENSIONS, impl

from . import msight_style
from .payloads import load

PAYLOADS = load()
NAMES = list(PAYLOADS)


def _frame(wire, name):
    p, enc = PAYLOADS[name]
    if isinstance(p, np.ndarray):
        return wire.Frame.from_array(p, sensor_name="mcity_edge-gs-ne_camera", device_name="edge-01", encoding=enc)
    return wire.Frame.from_bytes(p, sensor_name="mcity_edge-gs-ne_camera", device_name="edge-01", encoding=enc)


def _u8(p):
    return p.reshape(-1).view(np.uint8) if isinstance(p, np.ndarray) else np.frombuffer(p, np.uint8)


WIRES = [("ext", impl)] if HAS_EXTENSIONS else []
WIRES.append(("py", _pywire))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which,wire", WIRES, ids=[w[0] for w in WIRES])
def test_encode(benchmark, name, which, wire):
    f = _frame(wire, name)
    benchmark.group = name
    benchmark.extra_info.update(contender=f"{which}.encode", payload=name)
    out = benchmark(wire.encode, f)
    assert len(out) >= f.nbytes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which,wire", WIRES, ids=[w[0] for w in WIRES])
def test_encode_parts(benchmark, name, which, wire):
    f = _frame(wire, name)
    benchmark.group = name
    benchmark.extra_info.update(contender=f"{which}.encode_parts", payload=name)
    out = benchmark(wire.encode_parts, f)
    benchmark.extra_info["header_bytes"] = len(out[0])


@pytest.mark.parametrize("name", [n for n in NAMES if _frame(impl, n).nbytes > 1 << 20])
@pytest.mark.parametrize("how", ["joined", "parts"])
def test_fragment(benchmark, name, how):
    """Into 1 MB fragments, as the NATS and Kafka publishers do: from the joined frame (encode,
    then fragment: two copies) or gathered straight from encode_parts (one copy)."""
    from msight_fast.codec import fragment
    f = _frame(impl, name)
    benchmark.group = name
    benchmark.extra_info.update(contender=f"fragment_{how}", payload=name)
    make = (lambda: impl.encode(f)) if how == "joined" else (lambda: impl.encode_parts(f))
    out = benchmark(lambda: fragment(make(), 1 << 20))
    assert sum(len(x) for x in out) > f.nbytes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which,wire", WIRES, ids=[w[0] for w in WIRES])
def test_decode(benchmark, name, which, wire):
    buf = wire.encode(_frame(wire, name))
    benchmark.group = name
    benchmark.extra_info.update(contender=f"{which}.decode", payload=name)
    # .array / .data included: a decode that defers building the view would be flattered otherwise
    if isinstance(PAYLOADS[name][0], np.ndarray):
        out = benchmark(lambda: wire.decode(buf).array)
    else:
        out = benchmark(lambda: wire.decode(buf).data)
    assert out is not None


@pytest.mark.parametrize("name", NAMES)
def test_floor_memcpy(benchmark, name):
    src = _u8(PAYLOADS[name][0])
    benchmark.group = name
    benchmark.extra_info.update(contender="floor.memcpy", payload=name)

    def copy():
        dst = np.empty(src.nbytes, np.uint8)
        np.copyto(dst, src)
        return dst
    benchmark(copy)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("band", ["inband", "oob"])
def test_pickle5(benchmark, name, band):
    p = PAYLOADS[name][0]
    benchmark.group = name
    benchmark.extra_info.update(contender=f"pickle5_{band}.encode", payload=name)
    if band == "inband":
        benchmark(pickle.dumps, p, protocol=5)
    else:
        def dump():
            bufs = []
            head = pickle.dumps(p, protocol=5, buffer_callback=bufs.append)
            return head, [b.raw() for b in bufs]
        benchmark(dump)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("band", ["inband", "oob"])
def test_pickle5_loads(benchmark, name, band):
    # pickle is a speed reference only: msight_fast never unpickles anything from the wire
    p = PAYLOADS[name][0]
    benchmark.group = name
    benchmark.extra_info.update(contender=f"pickle5_{band}.decode", payload=name)
    if band == "inband":
        blob = pickle.dumps(p, protocol=5)
        benchmark(pickle.loads, blob)
    else:
        bufs = []
        head = pickle.dumps(p, protocol=5, buffer_callback=bufs.append)
        raws = [b.raw() for b in bufs]
        benchmark(lambda: pickle.loads(head, buffers=raws))


@pytest.mark.parametrize("name", NAMES)
def test_msight_style(benchmark, name):
    p, enc = PAYLOADS[name]
    benchmark.group = name
    benchmark.extra_info.update(contender="msight.encode", payload=name)
    benchmark(msight_style.encode, p, encoding=enc)


@pytest.mark.parametrize("name", NAMES)
def test_msight_style_decode(benchmark, name):
    p, enc = PAYLOADS[name]
    blob = msight_style.encode(p, encoding=enc)
    benchmark.group = name
    benchmark.extra_info.update(contender="msight.decode", payload=name)
    out = benchmark(msight_style.decode, blob)
    assert out.nbytes == (p.nbytes if isinstance(p, np.ndarray) else len(p))


def _struct_descriptor(fields, itemsize):
    import struct
    out = [struct.pack("<BIH", 2, itemsize, len(fields))]
    for i, (desc, off) in enumerate(fields):
        name = str(i).encode()
        out.append(struct.pack("<H", len(name)) + name + struct.pack("<I", off) + desc)
    return b"".join(out)


def _descriptors():
    import struct

    from msight_fast import _schema as S
    f4 = struct.pack("<BccI", 1, b"<", b"f", 4)
    inner = _struct_descriptor([(f4, 4 * j) for j in range(31)], 124)
    return {
        "lidar": S.dtype_to_wire(np.dtype(PAYLOADS["lidar"][0].dtype)),
        # 32 structs of 31 float32 fields: 1,024 fields in all, 15 KB; the costliest shape found
        # within the descriptor limits (flat, nested, sub-array and overlapping fields were tried)
        "worst": _struct_descriptor([(inner, 124 * i) for i in range(32)], 124 * 32),
    }


@pytest.mark.parametrize("which", ["lidar", "worst"])
def test_descriptor_parse(benchmark, which):
    """What a new dtype descriptor costs a receiver: each distinct one is parsed once (the compiled
    core caches it), so a stream of forged descriptors costs at most this much CPU per frame."""
    from msight_fast import _schema as S
    blob = _descriptors()[which]
    benchmark.group = "descriptor"
    benchmark.extra_info.update(contender=f"descriptor.{which}", payload="descriptor", nbytes=len(blob))
    dt = benchmark(S.dtype_from_wire, blob)
    assert dt.itemsize > 0


@pytest.mark.skipif(not HAS_EXTENSIONS, reason="the compiled CRC32C")
@pytest.mark.parametrize("how", ["hardware", "table"])
def test_crc32c_1mib(benchmark, how):
    """CRC32C of a 1 MiB fragment's payload, as every fragment carries: the crc32 instruction in
    three joined chains (what runs on x86-64 with SSE4.2) against the slicing-by-8 table that
    runs without it."""
    from msight_fast._ext import _wire
    if how == "hardware" and not _wire.HARDWARE_CRC32C:
        pytest.skip("no CRC32 instruction here")
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    benchmark.group = "crc32c 1 MiB"
    benchmark.extra_info.update(contender=f"crc32c_{how}", payload="1MiB")
    fn = _wire.crc32c if how == "hardware" else _wire._crc32c_software
    assert benchmark(fn, data) == _wire._crc32c_software(data)


def _small_frames(n=225):
    """A Kafka batch's worth of 1 KB frames, as ``Bus.publish`` hands them over (encode_parts)."""
    from msight_fast.codec import Frame, encode_parts
    return [encode_parts(Frame.from_bytes(bytes([i % 256]) * 1024, sensor_name="t", encoding="bytes"))
            for i in range(n)]


@pytest.mark.skipif(not HAS_EXTENSIONS, reason="the compiled batch writer")
@pytest.mark.parametrize("which", ["compiled", "compiled_reused", "twin"])
def test_batch_pack_225x1k(benchmark, which):
    """Adding 225 small frames to a batch and packing the container, as a Kafka publisher does
    for each batch: the compiled writer new for each batch, the compiled writer kept and cleared
    (what the Kafka transport does), and the twin (the code that ran before the compiled one)."""
    from msight_fast import codec
    from msight_fast._ext import _wire
    writer = codec._BatchWriter if which == "twin" else _wire.BatchWriter
    frames = _small_frames()
    kept = writer()

    def fill():
        if which == "compiled_reused":
            w = kept
            w.clear()
        else:
            w = writer()
        for parts in frames:
            w.add(parts)
        return w.pack()
    benchmark.group = "batch pack 225 x 1 KB"
    benchmark.extra_info.update(contender=f"batch_pack_{which}", payload="225x1k")
    assert codec.batch_frames(benchmark(fill)) == [b"".join(p) for p in frames]


@pytest.mark.skipif(not HAS_EXTENSIONS, reason="the compiled batch reader")
@pytest.mark.parametrize("which", ["compiled", "twin"])
def test_batch_frames_225x1k(benchmark, which):
    """Splitting a 225-frame container back into frames (every rule checked), as a Kafka
    subscriber does for each batch message: compiled against the twin."""
    from msight_fast import codec
    from msight_fast._ext import _wire
    frames = _small_frames()
    c = codec.pack_batch(frames)
    fn = _wire.batch_frames if which == "compiled" else codec._batch_frames
    benchmark.group = "batch frames 225 x 1 KB"
    benchmark.extra_info.update(contender=f"batch_frames_{which}", payload="225x1k")
    assert benchmark(fn, c) == [b"".join(p) for p in frames]
