"""A small GGUF reader and writer, written for untrusted input.

GGUF (version 2 and 3, little-endian) is::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x  (key: string, type: u32, value)
    n_tensors x (name: string, n_dims u32, dims u64[n_dims], ggml type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset, offset a multiple of the alignment

where a string is ``u64 length + UTF-8 bytes`` and an array is ``element type
u32 + count u64 + elements``.  The reader checks every length and count
against the bytes that remain before it reads or allocates anything, so a
malformed, truncated or hostile file costs at most its own size and ends in a
ValueError.  Only F32 tensors are decoded (what control vectors hold); other
ggml types are refused.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
MAX_FILE_BYTES = 256 << 20
MAX_LIST_ITEMS = 1 << 20  # strings and arrays inside arrays, over the whole file

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
           FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# ggml tensor types this module decodes
GGML_F32 = 0
_TENSOR_DTYPE = {GGML_F32: np.dtype("<f4")}  # control vectors are F32


@dataclasses.dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: Tuple[int, ...]  # ggml order: ne[0] (contiguous) first
    data: np.ndarray        # fp32, flat


@dataclasses.dataclass
class GGUFFile:
    version: int
    metadata: Dict[str, Any]
    types: Dict[str, int]  # key -> value type
    tensors: List[GGUFTensor]
    alignment: int


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0
        self.list_items = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                             f"the file has {len(self.buf) - self.pos} left")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"{what} length")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"corrupt GGUF: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            dt = np.dtype(_SCALAR[vtype])
            self.need(dt.itemsize, what)
            v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
            self.pos += dt.itemsize
            return bool(v) if vtype == BOOL else v.item()
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"corrupt GGUF: {what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            etype = self.unpack("<I", f"{what} element type")
            count = self.unpack("<Q", f"{what} count")
            if etype in _SCALAR:
                dt = np.dtype(_SCALAR[etype])
                if count > self.remaining() // dt.itemsize:
                    raise ValueError(f"corrupt GGUF: {what} declares {count} elements, more than the file holds")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.astype(bool) if etype == BOOL else arr
            if etype in (STRING, ARRAY):
                min_size = 8 if etype == STRING else 12
                if count > self.remaining() // min_size:
                    raise ValueError(f"corrupt GGUF: {what} declares {count} elements, more than the file holds")
                self.list_items += count
                if self.list_items > MAX_LIST_ITEMS:
                    raise ValueError(f"GGUF: more than {MAX_LIST_ITEMS} strings or arrays inside arrays; "
                                     "not a control vector")
                return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise ValueError(f"corrupt GGUF: {what} has unknown element type {etype}")
        raise ValueError(f"corrupt GGUF: {what} has unknown value type {vtype}")


def read_bytes(path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes, refusing files larger than ``max_bytes``."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ValueError(f"path: {path} is {size} bytes, more than the {max_bytes} allowed")
        with open(path, "rb") as f:
            data = f.read(size + 1)  # read(n) allocates n bytes up front: ask for what is there
    except OSError as err:
        raise ValueError(f"path: cannot read {path}: {err}") from None
    if len(data) > size:
        raise ValueError(f"path: {path} changed while it was read")
    return data


def parse(buf: bytes) -> GGUFFile:
    """Parse a whole GGUF file held in ``buf`` (see the module doc)."""
    c = _Cursor(bytes(buf))
    c.need(4, "magic")
    if c.buf[:4] != MAGIC:
        raise ValueError(f"not a GGUF file: magic {c.buf[:4]!r}, expected {MAGIC!r}")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16:
            raise ValueError("big-endian GGUF files are not supported")
        raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # each metadata entry takes >= 13 bytes, each tensor info >= 28: refuse counts the file cannot hold
    if n_kv > c.remaining() // 13:
        raise ValueError(f"corrupt GGUF: declares {n_kv} metadata entries, more than the file holds")
    metadata: Dict[str, Any] = {}
    types: Dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        if key in metadata:
            raise ValueError(f"corrupt GGUF: duplicate metadata key {key!r}")
        vtype = c.unpack("<I", f"type of {key!r}")
        metadata[key] = c.value(vtype, f"value of {key!r}")
        types[key] = vtype
    if n_tensors > c.remaining() // 28:
        raise ValueError(f"corrupt GGUF: declares {n_tensors} tensors, more than the file holds")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if ("general.alignment" in types and types["general.alignment"] != UINT32) or not isinstance(alignment, int) \
            or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"corrupt GGUF: general.alignment must be a power-of-two u32, got {alignment!r}")
    infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"tensor name {i}")
        if name in names:
            raise ValueError(f"corrupt GGUF: duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.unpack("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(c.unpack("<Q", f"dimension of {name!r}") for _ in range(n_dims))
        ggml_type = c.unpack("<I", f"type of {name!r}")
        offset = c.unpack("<Q", f"offset of {name!r}")
        infos.append((name, dims, ggml_type, offset))
    data_start = -(-c.pos // alignment) * alignment
    data_len = len(c.buf) - data_start
    tensors = []
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in _TENSOR_DTYPE:
            raise ValueError(f"tensor {name!r}: ggml type {ggml_type} is not supported (F32 only)")
        count = 1
        for d in dims:
            count *= d  # Python ints: no overflow; bounded by the check below
        nbytes = count * _TENSOR_DTYPE[ggml_type].itemsize
        if offset % alignment:
            raise ValueError(f"corrupt GGUF: tensor {name!r} offset {offset} is not a multiple of {alignment}")
        if data_len < 0 or offset > data_len or nbytes > data_len - offset:
            raise ValueError(f"truncated or corrupt GGUF: tensor {name!r} ({nbytes} bytes at data offset {offset}) "
                             f"lies outside the {max(data_len, 0)} bytes of tensor data")
        raw = np.frombuffer(c.buf, dtype=_TENSOR_DTYPE[ggml_type], count=count, offset=data_start + offset)
        tensors.append(GGUFTensor(name, ggml_type, dims, raw.astype(np.float32)))
    return GGUFFile(version, metadata, types, tensors, alignment)


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _pack_string(value)
    if vtype in _SCALAR:
        return np.array([value], dtype=_SCALAR[vtype]).tobytes()
    raise ValueError(f"metadata: value type {vtype} is not supported by this writer")


def write(path, metadata: Sequence[Tuple[str, int, Any]], tensors: Sequence[Tuple[str, np.ndarray]],
          alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file: ``metadata`` as ``(key, value type, value)``,
    ``tensors`` as ``(name, fp32 array)`` (1-D or more; ggml order is the
    reverse of numpy's)."""
    out = bytearray()
    out += MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        out += _pack_string(key) + struct.pack("<I", vtype) + _pack_value(vtype, value)
    blobs = []
    offset = 0
    for name, arr in tensors:
        a = np.ascontiguousarray(arr, dtype="<f4")
        dims = a.shape[::-1]
        out += _pack_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", GGML_F32, offset)
        blob = a.tobytes()
        pad = -len(blob) % alignment
        blobs.append(blob + b"\0" * pad)
        offset += len(blob) + pad
    out += b"\0" * (-len(out) % alignment)
    for blob in blobs:
        out += blob
    with open(path, "wb") as f:
        f.write(out)
