"""Streaming safetensors: read a header, copy one tensor at a time, write without holding tensors.

`safetensors.torch.save_file` needs every tensor in memory and `safe_open` maps whole files;
for a 90 GB Mixtral we need neither. The format is simple enough to stream:
8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch

from shard_tool.errors import ShardError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
               "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the reference implementation
COPY_CHUNK_BYTES = 16 * 1024 * 1024  # bounds the split's memory whatever the tensor size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]
    path: str  # the file holding it
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and check a safetensors header. Raises ShardError on a truncated or corrupt file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ShardError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ShardError(f"{path}: corrupt or truncated safetensors header")
            raw = f.read(header_len)
    except OSError as e:
        raise ShardError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise ShardError(f"{path}: corrupt safetensors header (not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{path}: corrupt safetensors header entry for {name}") from None
        if dtype not in DTYPE_BYTES:
            raise ShardError(f"{path}: tensor {name} has unknown dtype {dtype}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != nbytes or begin < 0:
            raise ShardError(f"{path}: tensor {name}: offsets do not match its shape {shape}")
        if data_start + end > size:
            raise ShardError(f"{path}: truncated: tensor {name} ends past the end of the file")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    return tensors, metadata


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read into memory (for small tensors and tests; the split streams instead)."""
    with open(info.path, "rb") as f:
        f.seek(info.offset)
        data = bytearray(info.nbytes)
        if f.readinto(data) != info.nbytes:
            raise ShardError(f"{info.path}: truncated while reading {info.name}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=TORCH_DTYPE[info.dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPE[info.dtype]).reshape(info.shape)


def _converter(src: str, dst: str) -> Callable[[memoryview], object]:
    """Chunk -> bytes-like in the target dtype (elementwise, so chunks convert independently)."""
    if src == dst:
        return lambda chunk: chunk
    src_t, dst_t = TORCH_DTYPE[src], TORCH_DTYPE[dst]
    # uint8 view: numpy has no bfloat16, but any tensor's bytes export as uint8 without a copy
    return lambda chunk: torch.frombuffer(chunk, dtype=src_t).to(dst_t).view(torch.uint8).numpy()


class StreamingWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first; `copy_from` then streams each
    tensor's bytes from its source in chunks, converting dtype on the way, hashing as it writes.
    """

    def __init__(self, path: str, layout: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.order = [name for name, _, _ in layout]
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writes
        self.dtypes = {name: dtype for name, dtype, _ in layout}
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self._file: BinaryIO = open(path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        self._file.write(data)
        self.hash.update(data)
        self.bytes_written += len(data)

    def copy_from(self, src: TensorInfo, progress: Callable[[int], None] = lambda n: None) -> None:
        name = self.order[self._next]
        if name != src.name:
            raise RuntimeError(f"tensors must be written in header order: {name} before {src.name}")
        self._next += 1
        convert = _converter(src.dtype, self.dtypes[name])
        # chunks hold whole elements of the source dtype so each converts on its own
        chunk_bytes = COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % DTYPE_BYTES[src.dtype]
        buffer = bytearray(min(chunk_bytes, src.nbytes))
        view = memoryview(buffer)
        with open(src.path, "rb", buffering=0) as f:
            f.seek(src.offset)
            left = src.nbytes
            while left:
                n = f.readinto(view[: min(left, len(buffer))])
                if not n:
                    raise ShardError(f"{src.path}: truncated while reading {src.name}")
                self._write(convert(view[:n]))
                left -= n
                progress(n)

    def close(self) -> str:
        """Finish the file (fsync'd); returns its sha256."""
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
