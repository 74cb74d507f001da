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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from common.errors import ShardError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPE_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                    "BOOL": "bool"}
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


def torch_dtype(code: str):
    """The torch dtype of a safetensors code. torch is imported only here: a plain split
    (no dtype change) never loads it, which keeps its memory small."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAME[code])


def read_tensor(info: TensorInfo):
    """One tensor, read into memory (for small tensors and tests; the split streams instead)."""
    import torch

    with open(info.path, "rb") as f:
        f.seek(info.offset)
        data = bytearray(info.nbytes)
        if f.readinto(data) != info.nbytes:
            raise ShardError(f"{info.path}: truncated while reading {info.name}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(data, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def _converter(src: str, dst: str) -> Callable[[memoryview], object]:
    """Chunk -> bytes-like in the target dtype (elementwise, so chunks convert independently)."""
    if src == dst:
        return lambda chunk: chunk
    import torch

    src_t, dst_t = torch_dtype(src), torch_dtype(dst)
    # uint8 view: numpy has no bfloat16, but any tensor's bytes export as uint8 without a copy
    return lambda chunk: torch.frombuffer(chunk, dtype=src_t).to(dst_t).view(torch.uint8).numpy()


class StreamingWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first; `copy_from` then streams each
    tensor's bytes from its source in chunks, hashing as it writes. Same-dtype bytes move by
    copy_file_range (in the kernel, like `cp`) while a worker thread hashes the chunk just
    read; a dtype change converts chunk by chunk in user space.
    """

    def __init__(self, path: str, layout: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.order = [name for name, _, _ in layout]
        self.dtypes = {name: dtype for name, dtype, _ in layout}
        self.sizes = {name: math.prod(shape) * DTYPE_BYTES[dtype] for name, dtype, shape in layout}
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in layout:
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + self.sizes[name]]}
            offset += self.sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writes
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        while view:
            view = view[os.write(self._fd, view):]
        self.bytes_written += len(data)

    def _start(self, name: str) -> None:
        expected = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"tensors must be written in header order: {expected} before {name}")
        self._next += 1

    def _check_written(self, name: str, start: int) -> None:
        if self.bytes_written - start != self.sizes[name]:
            raise RuntimeError(f"{name}: wrote {self.bytes_written - start} bytes, "
                               f"header says {self.sizes[name]}")

    def append_raw(self, name: str, chunks: Iterable) -> None:
        """Write tensor `name` from raw bytes in its target dtype (benchmarks, tests)."""
        self._start(name)
        start = self.bytes_written
        for chunk in chunks:
            self._write(chunk)
        self._check_written(name, start)

    def copy_from(self, src: TensorInfo, progress: Callable[[int], None] = lambda n: None) -> None:
        """Append tensor `src` (the next in header order), converting to its target dtype.
        Raises ShardError when the source turns out shorter than its header says."""
        self._start(src.name)
        start = self.bytes_written
        with open(src.path, "rb", buffering=0) as f:
            if src.dtype == self.dtypes[src.name]:
                self._copy_same_dtype(f.fileno(), src, progress)
            else:
                self._copy_converted(f.fileno(), src, progress)
        self._check_written(src.name, start)

    def _copy_same_dtype(self, src_fd: int, src: TensorInfo, progress) -> None:
        # two buffers: one being hashed by the worker while the next is read
        chunk_bytes = min(COPY_CHUNK_BYTES, src.nbytes)
        buffers = [bytearray(chunk_bytes), bytearray(chunk_bytes)]
        pending = None
        done = 0
        while done < src.nbytes:
            n = min(chunk_bytes, src.nbytes - done)
            view = memoryview(buffers[(done // chunk_bytes) % 2])[:n]
            if os.preadv(src_fd, [view], src.offset + done) != n:
                raise ShardError(f"{src.path}: truncated while reading {src.name}")
            if pending is not None:
                pending.result()
            pending = self._hasher.submit(self.hash.update, view)
            self._copy_range(src_fd, src.offset + done, view)
            done += n
            self.bytes_written += n
            progress(n)
        if pending is not None:
            pending.result()

    def _copy_range(self, src_fd: int, src_offset: int, data: memoryview) -> None:
        """In-kernel copy of bytes already read (and being hashed); plain write if refused."""
        copied = 0
        try:
            while copied < len(data):
                n = os.copy_file_range(src_fd, self._fd, len(data) - copied, src_offset + copied)
                if n == 0:
                    break
                copied += n
        except OSError:  # EXDEV/ENOSYS/EINVAL on some kernels and filesystems
            pass
        rest = data[copied:]
        while rest:
            rest = rest[os.write(self._fd, rest):]

    def _copy_converted(self, src_fd: int, src: TensorInfo, progress) -> None:
        convert = _converter(src.dtype, self.dtypes[src.name])
        # chunks hold whole elements of the source dtype so each converts on its own
        chunk_bytes = COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % DTYPE_BYTES[src.dtype]
        buffer = bytearray(min(chunk_bytes, src.nbytes))
        done = 0
        while done < src.nbytes:
            view = memoryview(buffer)[: min(len(buffer), src.nbytes - done)]
            n = os.preadv(src_fd, [view], src.offset + done)
            if n != len(view):
                raise ShardError(f"{src.path}: truncated while reading {src.name}")
            self._write(convert(view))
            done += n
            progress(n)

    def close(self) -> str:
        """Finish the file (fsync'd); returns its sha256."""
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors not written")
        os.fsync(self._fd)
        self.abort()
        return self.hash.hexdigest()

    def abort(self) -> None:
        self._hasher.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
