"""Safe, memory-mapped GGUF reader (versions 2 and 3).

Owns: parsing the header, metadata key/values and tensor descriptors of a GGUF file, and
exposing each tensor's bytes as a read-only numpy view of the memory-mapped file (no copy).
The file is untrusted: every count, length, offset and dimension is checked against the file
size and the format's rules before it is used, and every failure is a `GGUFError` whose
message names the problem in one line.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ggserve.kernels.ggml_types import BLOCK_LAYOUT, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are refused, not recursed into
# Python objects cost far more memory than their bytes in the file (a 12-byte empty nested array
# becomes a ~100-byte ndarray): cap them so a hostile file cannot exhaust memory. Real vocabs
# have < 300k strings and real files use nested arrays rarely, if ever.
MAX_STRING_ARRAY_ITEMS = 1 << 24
MAX_NESTED_ARRAYS = 1 << 20  # per file


class GGUFError(ValueError):
    """The file is not a valid GGUF file; the message says what is wrong."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("<u1"), ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"), ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("u1"),
    ValueType.UINT64: np.dtype("<u8"), ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's descriptor plus a read-only view of its bytes in the mapped file."""

    name: str
    ggml_type: GGMLType
    dims: tuple[int, ...]  # ggml `ne` order: dims[0] is the row length
    offset: int  # absolute offset of the data in the file
    n_bytes: int
    # uint8 (n_bytes,), read-only view of the mapping. Left out of ==/hash/repr: comparing
    # arrays elementwise would make `info == other` raise instead of returning a bool.
    data: np.ndarray = field(compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: (..., rows, row_length)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: memoryview, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.remaining()} left")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        raw = self.take(length, what)
        # Lossless for the rare vocab entry that is not valid UTF-8.
        return bytes(raw).decode("utf-8", errors="surrogateescape")


class GGUFFile:
    """A parsed GGUF file: `metadata`, `tensors` (name -> TensorInfo), `version`, `alignment`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise GGUFError(f"file is {size} bytes, too small for a GGUF header")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"cannot open {self.path}: {e.strerror or e}") from None
        self.size = size
        self._buffer = np.frombuffer(self._mmap, dtype=np.uint8)  # read-only, zero copy
        cursor = _Cursor(memoryview(self._mmap), size)
        self._parse(cursor)

    def release_pages(self, info: TensorInfo) -> None:
        """Drop this process's mapping of the whole pages inside `info`'s bytes (MADV_DONTNEED):
        after a tensor has been copied elsewhere (repacked), its file pages stop counting toward
        RSS. The mapping stays valid: touching the bytes again simply reads them back in."""
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page
        end = (info.offset + info.n_bytes) // page * page
        if end > start and hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    # -- parsing ----------------------------------------------------------------------------
    def _parse(self, cur: _Cursor) -> None:
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise GGUFError(f"bad magic {magic!r}: not a GGUF file")
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if int.from_bytes(self.version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                raise GGUFError("big-endian GGUF files are not supported (convert to little-endian)")
            raise GGUFError(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Every kv needs >= 8 (key length) + 4 (type) + 1 bytes; every tensor >= 8+4+8+4+8.
        if n_kv > cur.remaining() // 13:
            raise GGUFError(f"metadata count {n_kv} is impossible for a {self.size}-byte file")
        if n_tensors > cur.remaining() // 32:
            raise GGUFError(f"tensor count {n_tensors} is impossible for a {self.size}-byte file")

        self.metadata: dict[str, Any] = {}
        self._nested_budget = MAX_NESTED_ARRAYS
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r}")
            vtype = self._value_type(cur.u32(f"type of {key!r}"), key)
            self.metadata[key] = self._read_value(cur, vtype, key, depth=0)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise GGUFError(f"general.alignment must be a power of two, got {alignment!r}")
        self.alignment = alignment

        descriptors = [self._read_tensor_descriptor(cur, i) for i in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
        self.data_offset = data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, dims, rel_offset, n_bytes in descriptors:
            if name in self.tensors:
                raise GGUFError(f"duplicate tensor name {name!r}")
            if rel_offset % alignment:
                raise GGUFError(f"tensor {name!r} offset {rel_offset} is not aligned to {alignment}")
            start = data_start + rel_offset
            if start + n_bytes > self.size:
                raise GGUFError(f"tensor {name!r} data [{start}, {start + n_bytes}) lies past the "
                                f"end of the {self.size}-byte file")
            data = self._buffer[start:start + n_bytes]
            self.tensors[name] = TensorInfo(name, ggml_type, dims, start, n_bytes, data)

    @staticmethod
    def _value_type(raw: int, key: str) -> ValueType:
        try:
            return ValueType(raw)
        except ValueError:
            raise GGUFError(f"metadata {key!r} has unknown value type {raw}") from None

    def _read_value(self, cur: _Cursor, vtype: ValueType, key: str, depth: int) -> Any:
        if vtype == ValueType.STRING:
            return cur.string(f"string value of {key!r}")
        if vtype == ValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"metadata {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            item_type = self._value_type(cur.u32(f"array item type of {key!r}"), key)
            count = cur.u64(f"array length of {key!r}")
            if item_type in _SCALAR_DTYPES:
                dtype = _SCALAR_DTYPES[item_type]
                if count > cur.remaining() // dtype.itemsize:
                    raise GGUFError(f"array {key!r} of {count} items runs past the end of the file")
                raw = cur.take(count * dtype.itemsize, f"array {key!r}")
                values = np.frombuffer(raw, dtype=dtype).copy()
                return values.astype(bool) if item_type == ValueType.BOOL else values
            # Strings need >= 8 bytes each, nested arrays >= 12: reject impossible counts early.
            min_item = 8 if item_type == ValueType.STRING else 12
            if count > cur.remaining() // min_item:
                raise GGUFError(f"array {key!r} of {count} items runs past the end of the file")
            if item_type == ValueType.STRING:
                if count > MAX_STRING_ARRAY_ITEMS:
                    raise GGUFError(f"array {key!r} has {count} strings (limit "
                                    f"{MAX_STRING_ARRAY_ITEMS})")
                return self._read_string_array(cur, count, key)
            self._nested_budget -= count
            if self._nested_budget < 0:
                raise GGUFError(f"metadata {key!r}: more than {MAX_NESTED_ARRAYS} nested arrays "
                                "in the file")
            return [self._read_value(cur, item_type, key, depth + 1) for _ in range(count)]
        dtype = _SCALAR_DTYPES[vtype]
        raw = cur.take(dtype.itemsize, f"value of {key!r}")
        value = np.frombuffer(raw, dtype=dtype)[0]
        if vtype == ValueType.BOOL:
            return bool(value)
        return float(value) if vtype in (ValueType.FLOAT32, ValueType.FLOAT64) else int(value)

    @staticmethod
    def _read_string_array(cur: _Cursor, count: int, key: str) -> list[str]:
        # Hot for vocabularies (262k entries): unpack lengths without per-item method calls.
        buf, pos, size = cur.buf, cur.pos, cur.size
        unpack_from = struct.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                raise GGUFError(f"truncated file: string #{i} of array {key!r}")
            (length,) = unpack_from("<Q", buf, pos)
            pos += 8
            if length > size - pos:
                raise GGUFError(f"string #{i} of array {key!r} runs past the end of the file")
            append(str(buf[pos:pos + length], "utf-8", "surrogateescape"))
            pos += length
        cur.pos = pos
        return out

    def _read_tensor_descriptor(self, cur: _Cursor, index: int):
        name = cur.string(f"name of tensor #{index}")
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{MAX_DIMS})")
        dims = tuple(cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims))
        raw_type = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise GGUFError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        if ggml_type not in BLOCK_LAYOUT:
            raise GGUFError(f"tensor {name!r} has unsupported ggml type {ggml_type.name}")
        n_elements = 1
        for d in dims:
            if d <= 0:
                raise GGUFError(f"tensor {name!r} has a non-positive dimension in {dims}")
            n_elements *= d
            if n_elements > self.size * 8:  # no tensor can hold more elements than 8 per byte
                raise GGUFError(f"tensor {name!r} dims {dims} overflow the file size")
        block_elems, block_bytes = BLOCK_LAYOUT[ggml_type]
        if dims[0] % block_elems:
            raise GGUFError(f"tensor {name!r} row length {dims[0]} is not a multiple of the "
                            f"{ggml_type.name} block size {block_elems}")
        n_bytes = n_elements // block_elems * block_bytes
        return name, ggml_type, dims, offset, n_bytes

    # -- access -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError("general.architecture is missing or not a string")
        return arch

    def close(self) -> None:
        """Drop this object's references; the mapping closes once no tensor view is alive."""
        self.tensors = {}
        self._buffer = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
