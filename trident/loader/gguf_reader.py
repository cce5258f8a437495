"""A fast, strict reader of GGUF files: metadata, the tensor table, and zero-copy views of tensor bytes.

``gguf.GGUFReader`` wraps every string of a vocabulary in numpy views and needs seconds for a 50k-token
vocabulary; this reader walks the header once with ``struct`` (tens of milliseconds) and maps the file
copy-on-write, so tensor bytes are read only when a tensor is used. Every offset is checked against
the file size, so a truncated or corrupt file is a :class:`TridentError`, never an IndexError.
The type ids and block sizes come from the ``gguf`` package.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from trident.errors import TridentError

_MAGIC = b"GGUF"
_SCALAR_FORMATS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
_STRING = int(gguf.GGUFValueType.STRING)
_ARRAY = int(gguf.GGUFValueType.ARRAY)
_U64 = struct.Struct("<Q")
_MAX_DIMS = 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table."""

    name: str
    shape: tuple[int, ...]
    """In torch order (slowest dimension first), i.e. ggml's ``ne`` reversed."""
    type_id: int
    """ggml type id (``gguf.GGMLQuantizationType``)."""
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type name, e.g. "Q4_1", "F32"; "TYPE_<id>" for ids the gguf package does not know."""
        try:
            return gguf.GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"TYPE_{self.type_id}"

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table and a copy-on-write map of its bytes."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    file_bytes: int
    data: np.ndarray
    """The whole file as a writable copy-on-write uint8 map (writes never reach the file)."""

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise TridentError(f"{self.path}: GGUF metadata has no general.architecture; is this a model file?")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor, as a uint8 view (no copy)."""
        info = self.tensors[name]
        return self.data[info.offset : info.offset + info.nbytes]


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header and map its data; a TridentError if it is not a valid, complete GGUF."""
    size = os.path.getsize(path)
    if size < 24:
        raise TridentError(f"{path} is too small to be a GGUF file ({size} bytes); the file is truncated")
    with open(path, "rb") as f:
        head = f.read(4)
        if head != _MAGIC:
            raise TridentError(
                f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                "pass a .gguf model file or a Hugging Face model folder"
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        return _parse(path, buf, size)
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as e:
        raise TridentError(f"{path} is a corrupt or truncated GGUF file ({e}); download it again") from None


def _parse(path: str, buf: mmap.mmap, size: int) -> GGUFFile:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise TridentError(
            f"{path}: GGUF version {version} is not supported (only 2 and 3); the file is corrupt or was "
            "written by a llama.cpp newer than this gguf package"
        )
    # every entry takes at least a few bytes, so counts beyond the file size mean garbage
    if n_tensors > size // 8 or n_kv > size // 8:
        raise ValueError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    reader = _Cursor(buf, 24, size)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string()
        metadata[key] = reader.value(reader.u32())
    entries = []
    for _ in range(n_tensors):
        name = reader.string()
        n_dims = reader.u32()
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, reader.pos)
        reader.advance(8 * n_dims)
        type_id = reader.u32()
        offset = reader.u64()
        entries.append((name, tuple(reversed(dims)), type_id, offset))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two")
    data_start = -(-reader.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, type_id, offset in entries:
        info = GGUFTensorInfo(name, shape, type_id, data_start + offset, _tensor_nbytes(path, name, shape, type_id))
        if info.offset + info.nbytes > size:
            raise TridentError(
                f"{path} is truncated: tensor {name!r} ends at byte {info.offset + info.nbytes:,} "
                f"but the file "
                f"has {size:,} bytes; download it again"
            )
        tensors[name] = info
    data = np.frombuffer(buf, dtype=np.uint8)
    return GGUFFile(path, version, metadata, tensors, size, data)


def _tensor_nbytes(path: str, name: str, shape: tuple[int, ...], type_id: int) -> int:
    try:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise TridentError(
            f"{path}: tensor {name!r} has ggml type id {type_id}, which the gguf package does not know; "
            "re-quantize the model to a common type (Q4_K_M, Q8_0, F16) or upgrade gguf"
        ) from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[-1] % block:
        raise ValueError(f"tensor {name!r} row length {shape[-1]} is not a multiple of its block size {block}")
    return n // block * block_bytes


class _Cursor:
    """Sequential, bounds-checked reads of little-endian GGUF values from a buffer."""

    def __init__(self, buf: mmap.mmap, pos: int, size: int) -> None:
        self.buf, self.pos, self.size = buf, pos, size

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos > self.size:
            raise ValueError("unexpected end of file in the header")

    def u32(self) -> int:
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > self.size:
            raise ValueError("a string runs past the end of the file")
        s = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += struct.calcsize(fmt)
            return v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise ValueError(f"unknown metadata value type {vtype}")

    def array(self) -> list[Any]:
        item_type = self.u32()
        count = self.u64()
        if count > self.size:
            raise ValueError(f"implausible array length {count}")
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            width = struct.calcsize(fmt)
            end = self.pos + width * count
            if end > self.size:
                raise ValueError("an array runs past the end of the file")
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
            self.pos = end
            return values
        if item_type == _STRING:
            return self._strings(count)
        return [self.value(item_type) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise ValueError("a string runs past the end of the file")
            append(buf[pos:end].decode("utf-8"))
            pos = end
        self.pos = pos
        return out
