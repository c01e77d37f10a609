"""Vector files: safetensors and llama.cpp GGUF control vectors.

GGUF files are read across with the ``gguf`` package (llama.cpp's own Python
reader and writer, which repeng uses): what steerkern writes, gguf reads as a
control vector, and what gguf writes (as repeng's ``export_gguf`` does),
steerkern reads.  The readers are then fuzzed: truncated, bit-flipped,
hostile and disguised files must each end in a ValueError (or, for a harmless
change, the original vectors), quickly and without large allocations, and
nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

from steerkern.vectors import VectorSet, io
from steerkern.vectors import _gguf

gguf = pytest.importorskip("gguf")

D = 16


def sample(layers=(1, 2, 5), d=D, **kw):
    g = torch.Generator().manual_seed(0)
    kw.setdefault("model_id", "org/tiny-llama")
    kw.setdefault("model_type", "llama")
    kw.setdefault("method", "pca_diff")
    return VectorSet({layer: torch.randn(d, generator=g) for layer in layers}, num_layers=6, **kw)


def write_with_gguf_package(path, directions, model_hint="llama", extra=None):
    """A control vector written the way repeng's export_gguf does."""
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", model_hint)
    w.add_uint32("controlvector.layer_count", len(directions))
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, arr in directions.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- round trips --------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    vs = sample(metadata={"position": "last", "separation": {"1": 2.5}})
    path = tmp_path / f"v{suffix}"
    vs.save(path)
    back = io.load(path)
    assert back == vs and VectorSet.load(path) == vs


def test_written_gguf_is_a_llama_cpp_control_vector(tmp_path):
    vs = sample()
    path = tmp_path / "v.gguf"
    io.save(vs, path)
    r = gguf.GGUFReader(str(path))

    def field(name):
        f = r.get_field(name)
        return f.contents() if hasattr(f, "contents") else bytes(f.parts[-1]).decode()

    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == "llama"
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 3
    assert r.get_field("controlvector.layer_count").types[0] == gguf.GGUFValueType.UINT32
    names = [t.name for t in r.tensors]
    assert names == ["direction.1", "direction.2", "direction.5"]
    for t in r.tensors:
        layer = int(t.name.split(".")[1])
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [D]
        assert np.array_equal(np.asarray(t.data), vs[layer].numpy())
    assert json.loads(field("steerkern.metadata"))["method"] == "pca_diff"


def test_reads_control_vectors_written_by_the_gguf_package(tmp_path):
    g = np.random.default_rng(0)
    dirs = {f"direction.{i}": g.standard_normal(D).astype(np.float32) for i in (3, 1, 12)}
    path = tmp_path / "repeng.gguf"
    write_with_gguf_package(path, dirs, model_hint="mistral")
    vs = io.load(path)
    assert vs.layers == [1, 3, 12] and vs.model_type == "mistral" and vs.site == "post_mlp"
    for name, arr in dirs.items():
        assert np.array_equal(vs[int(name.split(".")[1])].numpy(), arr)


def test_gguf_layer_conventions(tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        io.save(sample(layers=(0, 1)), tmp_path / "x.gguf")
    # pre of layer L is block L-1's output: direction.(L-1)
    io.save(sample(layers=(2, 3), site="pre"), tmp_path / "pre.gguf")
    back = io.load(tmp_path / "pre.gguf")
    assert back.layers == [1, 2] and back.site == "post_mlp"
    assert torch.equal(back[1], sample(layers=(2, 3))[2])
    with pytest.raises(ValueError, match="embeddings"):
        io.save(sample(layers=(0,), site="pre"), tmp_path / "y.gguf")


def test_format_from_suffix_and_magic(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        io.save(sample(), tmp_path / "v.bin")
    io.save(sample(), tmp_path / "v.data", format="gguf")
    assert io.load(tmp_path / "v.data") == sample()  # format from the magic, not the name
    with pytest.raises(ValueError, match="format"):
        io.save(sample(), tmp_path / "v.gguf", format="pt")


# ---- never unpickle -----------------------------------------------------------

class _Canary:
    """Unpickling this creates a file: proof that something was unpickled."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["v.pt", "v.safetensors", "v.gguf"])
def test_pickles_are_refused_unopened(tmp_path, how, name):
    canary = tmp_path / "unpickled"
    payload = _Canary()
    payload.path = str(canary)
    path = tmp_path / name
    if how == "torch.save":
        torch.save({"vectors": torch.ones(3), "x": payload}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ValueError, match="never unpickles"):
        io.load(path)
    assert not canary.exists()


# ---- fuzzing ------------------------------------------------------------------

def _load_bytes(tmp_path, data: bytes, name="f.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return io.load(path)


def _expect_value_error_or_original(tmp_path, data, original, name):
    """A mutated file either still loads as the original vectors or ends in a ValueError."""
    t0 = time.perf_counter()
    try:
        got = _load_bytes(tmp_path, data, name)
    except ValueError:
        pass
    else:
        assert isinstance(got, VectorSet)
        if got != original:  # a flipped byte inside a float or a string: still a well-formed file
            assert got.hidden_size == original.hidden_size
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_truncated_files(tmp_path, suffix):
    vs = sample()
    io.save(vs, tmp_path / f"good{suffix}")
    data = (tmp_path / f"good{suffix}").read_bytes()
    cuts = sorted(set(range(0, len(data), 7)) | set(range(0, 64)) | {len(data) - 1})
    for cut in cuts:
        _expect_value_error_or_original(tmp_path, data[:cut], vs, f"cut{suffix}")


@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_random_corruptions(tmp_path, suffix):
    vs = sample()
    io.save(vs, tmp_path / f"good{suffix}")
    data = (tmp_path / f"good{suffix}").read_bytes()
    rng = random.Random(1234)
    for trial in range(300):
        b = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
        _expect_value_error_or_original(tmp_path, bytes(b), vs, f"mut{suffix}")


def test_random_bytes(tmp_path):
    rng = random.Random(7)
    for n in (0, 1, 3, 8, 9, 24, 100, 1000):
        for prefix in (b"", b"GGUF", b"GGUF\x03\x00\x00\x00"):
            data = prefix + bytes(rng.randrange(256) for _ in range(n))
            with pytest.raises(ValueError):
                _load_bytes(tmp_path, data, "rand.bin")


def _gguf_bytes(version=3, n_tensors=None, kvs=(), tensors=(), alignment=32, data=b""):
    def s(x):
        raw = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs))
    for key, vtype, raw in kvs:
        out += s(key) + struct.pack("<I", vtype) + raw
    for name, dims, ttype, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def _str(v):
    raw = v.encode()
    return struct.pack("<Q", len(raw)) + raw


ARCH = ("general.architecture", _gguf.STRING, _str("controlvector"))
GOOD_TENSOR = ("direction.1", (4,), 0, 0)
DATA = np.arange(4, dtype="<f4").tobytes()
HUGE = 2**63 - 1

HOSTILE = {
    "wrong magic": b"GGUG" + _gguf_bytes()[4:],
    "version 1": _gguf_bytes(version=1, kvs=[ARCH], tensors=[GOOD_TENSOR], data=DATA),
    "version 4": _gguf_bytes(version=4, kvs=[ARCH], tensors=[GOOD_TENSOR], data=DATA),
    "big-endian": b"GGUF" + struct.pack(">I", 3) + _gguf_bytes()[8:],
    "huge tensor count": _gguf_bytes(n_tensors=HUGE, kvs=[ARCH]),
    "huge kv count": b"GGUF" + struct.pack("<IQQ", 3, 1, HUGE),
    "huge key length": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", HUGE) + b"abc",
    "huge string value": _gguf_bytes(kvs=[("k", _gguf.STRING, struct.pack("<Q", HUGE) + b"x")]),
    "huge array count": _gguf_bytes(kvs=[("k", _gguf.ARRAY, struct.pack("<IQ", _gguf.UINT64, HUGE))]),
    "huge string array": _gguf_bytes(kvs=[("k", _gguf.ARRAY, struct.pack("<IQ", _gguf.STRING, HUGE))]),
    "nested arrays": _gguf_bytes(kvs=[("k", _gguf.ARRAY, struct.pack("<IQ", _gguf.ARRAY, 1) * 50)]),
    "unknown value type": _gguf_bytes(kvs=[("k", 99, b"\0" * 8)]),
    "unknown array type": _gguf_bytes(kvs=[("k", _gguf.ARRAY, struct.pack("<IQ", 77, 1))]),
    "non-utf8 key": _gguf_bytes(kvs=[(b"\xff\xfe", _gguf.UINT8, b"\0")]),
    "duplicate key": _gguf_bytes(kvs=[ARCH, ARCH], tensors=[GOOD_TENSOR], data=DATA),
    "alignment zero": _gguf_bytes(kvs=[ARCH, ("general.alignment", _gguf.UINT32, struct.pack("<I", 0))],
                                  tensors=[GOOD_TENSOR], data=DATA),
    "alignment not pow2": _gguf_bytes(kvs=[ARCH, ("general.alignment", _gguf.UINT32, struct.pack("<I", 24))],
                                      tensors=[GOOD_TENSOR], data=DATA),
    "alignment wrong type": _gguf_bytes(kvs=[ARCH, ("general.alignment", _gguf.STRING, _str("32"))],
                                        tensors=[GOOD_TENSOR], data=DATA),
    "huge dims": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (HUGE, HUGE, HUGE, HUGE), 0, 0)], data=DATA),
    "too many dims": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (1,) * 9, 0, 0)], data=DATA),
    "zero dims": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (), 0, 0)], data=DATA),
    "offset past end": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (4,), 0, 1 << 40)], data=DATA),
    "misaligned offset": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (4,), 0, 4)], data=DATA * 2),
    "data past end": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (400,), 0, 0)], data=DATA),
    "quantized type": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (32,), 2, 0)], data=b"\0" * 64),
    "f16 direction": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (4,), 1, 0)], data=b"\0" * 8),
    "2-d direction": _gguf_bytes(kvs=[ARCH], tensors=[("direction.1", (2, 2), 0, 0)], data=DATA),
    "direction.0": _gguf_bytes(kvs=[ARCH], tensors=[("direction.0", (4,), 0, 0)], data=DATA),
    "direction.-1": _gguf_bytes(kvs=[ARCH], tensors=[("direction.-1", (4,), 0, 0)], data=DATA),
    "direction.x": _gguf_bytes(kvs=[ARCH], tensors=[("direction.x", (4,), 0, 0)], data=DATA),
    "other tensor": _gguf_bytes(kvs=[ARCH], tensors=[("token_embd.weight", (4,), 0, 0)], data=DATA),
    "duplicate tensor": _gguf_bytes(kvs=[ARCH], tensors=[GOOD_TENSOR, GOOD_TENSOR], data=DATA),
    "sizes differ": _gguf_bytes(kvs=[ARCH], tensors=[GOOD_TENSOR, ("direction.2", (3,), 0, 32)],
                                data=DATA + b"\0" * 16 + DATA),
    "nan direction": _gguf_bytes(kvs=[ARCH], tensors=[GOOD_TENSOR], data=np.full(4, np.nan, "<f4").tobytes()),
    "no tensors": _gguf_bytes(kvs=[ARCH]),
    "model architecture": _gguf_bytes(kvs=[("general.architecture", _gguf.STRING, _str("llama"))],
                                      tensors=[GOOD_TENSOR], data=DATA),
    "corrupt steerkern json": _gguf_bytes(kvs=[ARCH, ("steerkern.metadata", _gguf.STRING, _str("{" * 100000))],
                                          tensors=[GOOD_TENSOR], data=DATA),
}


def test_hostile_gguf_template_is_valid(tmp_path):
    vs = _load_bytes(tmp_path, _gguf_bytes(kvs=[ARCH], tensors=[GOOD_TENSOR], data=DATA))
    assert vs.layers == [1] and torch.equal(vs[1], torch.arange(4.0))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_gguf(tmp_path, name):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError):
            _load_bytes(tmp_path, HOSTILE[name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 32 << 20, f"{name}: {peak} bytes allocated"


def _safetensors_bytes(header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


META = {"steerkern": json.dumps({"kind": "vectors", "version": 1, "hidden_size": 2})}
GOOD_HEADER = {"__metadata__": META, "layers": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
               "vectors": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]}}
GOOD_DATA = struct.pack("<q", 3) + struct.pack("<2f", 1.0, 2.0)


def _with(**changes):
    h = json.loads(json.dumps(GOOD_HEADER))
    for key, value in changes.items():
        if value is None:
            h.pop(key, None)
        else:
            h[key] = value
    return h


HOSTILE_SAFETENSORS = {
    "huge header length": struct.pack("<Q", HUGE) + b"{}",
    "header past end": struct.pack("<Q", 1000) + b'{"a": 1}',
    "header not json": _safetensors_bytes(b"{not json" + b" " * 20),
    "deep json": _safetensors_bytes(b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}"),
    "header a list": _safetensors_bytes(b"[1, 2, 3]      "),
    "no metadata": _safetensors_bytes(_with(__metadata__=None), GOOD_DATA),
    "plan file": _safetensors_bytes(_with(__metadata__={"steerkern": json.dumps({"kind": "steering"})}),
                                    GOOD_DATA),
    "newer version": _safetensors_bytes(
        _with(__metadata__={"steerkern": json.dumps({"kind": "vectors", "version": 99})}), GOOD_DATA),
    "offsets past end": _safetensors_bytes(
        _with(vectors={"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 1 << 40]}), GOOD_DATA),
    "shape lies": _safetensors_bytes(
        _with(vectors={"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [8, 16]}), GOOD_DATA),
    "wrong dtype": _safetensors_bytes(
        _with(vectors={"dtype": "U8", "shape": [1, 8], "data_offsets": [8, 16]}), GOOD_DATA),
    "1-d vectors": _safetensors_bytes(
        _with(vectors={"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}), GOOD_DATA),
    "missing layers": _safetensors_bytes(_with(layers=None), GOOD_DATA[8:]),
    "negative layer": _safetensors_bytes(GOOD_HEADER, struct.pack("<q", -3) + GOOD_DATA[8:]),
    "nan vector": _safetensors_bytes(GOOD_HEADER, GOOD_DATA[:8] + struct.pack("<2f", float("nan"), 1.0)),
    "hidden size lies": _safetensors_bytes(
        _with(__metadata__={"steerkern": json.dumps({"kind": "vectors", "version": 1, "hidden_size": 5})}),
        GOOD_DATA),
    "bad site": _safetensors_bytes(
        _with(__metadata__={"steerkern": json.dumps({"kind": "vectors", "version": 1, "site": 7})}), GOOD_DATA),
    "bad num_layers": _safetensors_bytes(
        _with(__metadata__={"steerkern": json.dumps({"kind": "vectors", "version": 1, "num_layers": "x"})}),
        GOOD_DATA),
}


def test_hostile_safetensors_template_is_valid(tmp_path):
    vs = _load_bytes(tmp_path, _safetensors_bytes(GOOD_HEADER, GOOD_DATA), "ok.safetensors")
    assert vs.layers == [3] and torch.equal(vs[3], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("name", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors(tmp_path, name):
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            _load_bytes(tmp_path, HOSTILE_SAFETENSORS[name], "h.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 64 << 20, f"{name}: {peak} bytes allocated"


def test_oversized_and_missing_files(tmp_path):
    path = tmp_path / "big.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF")
        f.seek(_gguf.MAX_FILE_BYTES + 10)
        f.write(b"\0")  # sparse: large on paper, nothing on disk
    with pytest.raises(ValueError, match="allowed"):
        io.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        io.load(tmp_path / "absent.gguf")
    os.mkdir(tmp_path / "dir.gguf")
    with pytest.raises(ValueError):
        io.load(tmp_path / "dir.gguf")
