"""manifest.json: what a split wrote, owned here and imported by agent and base station.

Layout of a split folder (OUT):
    manifest.json
    basestation/model.safetensors   every tensor but the routed experts (routers, shared
                                    experts and dense MLPs included), checkpoint names kept
    basestation/config.json, generation_config.json, tokenizer files
    experts/expert-003.safetensors  routed expert 3 of every MoE layer (fused tensors sliced;
                                    names in shard_tool/families.py); a layer split at 8 or 4
                                    bits holds its weight matrices as NAME.qweight/.scale/.offset
                                    (shard_tool/quant.py) and the file entry's `bits` says so

An edge box holds manifest.json and its own expert file(s) only; checks cover what is present
and what is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from common.errors import ShardError
from shard_tool.families import DOWN, GATE, GATE_UP, GPT_OSS, UP

# 1: every expert at 16 bits; 2: some expert layer at 8 or 4 bits. Both fingerprinted only
# `path:sha256` (+ bits), so a forged `bytes` or `tensors` keeps the real fingerprint (issue 20).
LEGACY_FORMAT_VERSIONS = (1, 2)
# 3: the fingerprint covers every field of every file entry. Written by this version; 1 and 2
# still load (their stored fingerprint checked the old way), and their in-memory fingerprint
# is the new one, so agents and base station agree whichever version each folder holds.
FORMAT_VERSION = 3
READABLE_VERSIONS = (*LEGACY_FORMAT_VERSIONS, FORMAT_VERSION)
FULL_BITS = 16
# Parts (shard_tool/families.py) whose matrices `--bits` quantises: the routed experts' weights.
# Biases and MXFP4 blocks/scales stay as they are.
QUANTISED_PARTS = (GATE, UP, GATE_UP, DOWN)
MANIFEST_NAME = "manifest.json"
BASESTATION_DIR = "basestation"
EXPERTS_DIR = "experts"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def expert_file_path(expert: int) -> str:
    return f"{EXPERTS_DIR}/expert-{expert:03d}.safetensors"


def stored_transposed(expert_kind: str) -> bool:
    """GPT-OSS keeps its expert matrices as [in, out] (x @ W); quantised they are stored as
    [out, in] like every other family, so quantisation is always per output channel."""
    return expert_kind == GPT_OSS


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the split folder, '/'-separated
    role: str  # "basestation" | "expert"
    bytes: int
    sha256: str
    expert: int | None = None
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape}
    # expert files: MoE layer -> 8 or 4 for the layers stored quantised; absent layers are 16
    # bits (the checkpoint's floats), so splits from before quantisation read as all-16
    bits: dict[int, int] = field(default_factory=dict)

    def layer_bits(self, layer: int) -> int:
        return self.bits.get(layer, FULL_BITS)

    def to_json(self) -> dict:
        out = {"path": self.path, "role": self.role, "bytes": self.bytes, "sha256": self.sha256}
        if self.expert is not None:
            out["expert"] = self.expert
        if self.bits:
            out["bits"] = {str(layer): b for layer, b in sorted(self.bits.items())}
        if self.tensors:
            out["tensors"] = self.tensors
        return out


def _read_bits(data) -> dict[int, int]:
    """A file entry's "bits" object. Raises ValueError/TypeError when malformed."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError("bits is not an object")
    bits = {int(layer): int(b) for layer, b in data.items()}
    bad = sorted({b for b in bits.values() if b not in (8, 4)})
    if bad:
        raise ValueError(f"bits {bad} (a quantised layer is 8 or 4 bits)")
    return bits


@dataclass(frozen=True)
class Manifest:
    family: str
    model: dict  # ModelShape.summary() (families.py) plus "dtype"
    files: tuple[FileEntry, ...]
    tool_version: str = "0"

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    @property
    def fingerprint(self) -> str:
        """Identifies the model and its bytes: agents and base station must agree on it. It
        covers every field a reader acts on (sizes and tensor lists included), so a manifest
        that carries it cannot describe other files than the real one."""
        files = [e.to_json() for e in sorted(self.files, key=lambda e: e.path)]
        return hashlib.sha256(json.dumps([self.family, self.model, files], sort_keys=True)
                              .encode()).hexdigest()

    @property
    def legacy_fingerprint(self) -> str:
        """The fingerprint format versions 1 and 2 stored: path and sha256 (and bits) only."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.family, self.model], sort_keys=True).encode())
        for entry in sorted(self.files, key=lambda e: e.path):
            digest.update(f"{entry.path}:{entry.sha256}\n".encode())
            if entry.bits:
                digest.update(f"bits:{json.dumps(entry.to_json()['bits'])}\n".encode())
        return digest.hexdigest()

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def moe_layers(self) -> list[int]:
        """Layers with routed experts (manifests from before moe_layers: Mixtral, every layer)."""
        return [int(i) for i in self.model.get("moe_layers", range(self.num_layers))]

    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    def expert_bits(self) -> dict[int, dict[int, int]]:
        """expert id -> {MoE layer: bits} for every expert file, 16 included."""
        return {e.expert: {layer: e.layer_bits(layer) for layer in self.moe_layers}
                for e in self.files if e.role == "expert" and e.expert is not None}

    def expert_file(self, expert: int) -> FileEntry:
        for entry in self.files:
            if entry.role == "expert" and entry.expert == expert:
                return entry
        raise ShardError(f"manifest has no shard for expert {expert}")

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "family": self.family,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "files": [e.to_json() for e in self.files],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ShardError(f"manifest format {data.get('format_version')!r} is not one of "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; re-split with this "
                             f"version of shard_tool")
        try:
            files = tuple(FileEntry(path=f["path"], role=f["role"], bytes=int(f["bytes"]),
                                    sha256=f["sha256"], expert=f.get("expert"),
                                    tensors=f.get("tensors", {}), bits=_read_bits(f.get("bits")))
                          for f in data["files"])
            manifest = cls(family=data["family"], model=dict(data["model"]), files=files,
                           tool_version=data.get("tool_version", "0"))
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"manifest is malformed: {e}") from None
        stored = manifest.legacy_fingerprint if version in LEGACY_FORMAT_VERSIONS \
            else manifest.fingerprint
        if data.get("fingerprint") != stored:
            raise ShardError("manifest fingerprint does not match its contents (edited or corrupt)")
        for entry in files:  # a manifest must not point outside its folder
            if entry.path.startswith("/") or ".." in entry.path.split("/"):
                raise ShardError(f"manifest lists an unsafe path: {entry.path}")
        return manifest


def read_json_object(path: str, missing: str, kind: str) -> dict:
    """A JSON file holding one object. Raises ShardError: `missing` when there is no file,
    else unreadable, or "not a `kind`"."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ShardError(missing) from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable: {e}") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: not a {kind}")
    return data


def load_manifest(folder: str) -> Manifest:
    """Read OUT/manifest.json. Raises ShardError when missing or malformed."""
    return Manifest.from_json(read_json_object(
        os.path.join(folder, MANIFEST_NAME),
        f"{folder}: no {MANIFEST_NAME} (not a shard_tool split)", "manifest"))


def write_manifest(folder: str, manifest: Manifest) -> None:
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_prefix(path: str, nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of a file: what a resumed push compares (the agent's
    partial file against the pusher's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while nbytes > 0:
            block = f.read(min(HASH_CHUNK_BYTES, nbytes))
            if not block:
                break
            digest.update(block)
            nbytes -= len(block)
    return digest.hexdigest()


def sha256_file(path: str, progress=lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
            progress(n)
    return digest.hexdigest()


def check_size(folder: str, entry: FileEntry) -> str:
    """The file's path, once its size matches the manifest. Raises ShardError."""
    path = os.path.join(folder, entry.path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ShardError(f"{entry.path}: missing") from None
    if size != entry.bytes:
        raise ShardError(f"{entry.path}: {size} bytes, manifest says {entry.bytes}")
    return path


def check_file(folder: str, entry: FileEntry, progress=lambda n: None) -> None:
    """Size, sha256 and (for safetensors) the tensor list of one file. Raises ShardError."""
    from shard_tool.safetensors_io import read_header

    path = check_size(folder, entry)
    if sha256_file(path, progress) != entry.sha256:
        raise ShardError(f"{entry.path}: sha256 does not match the manifest (corrupt)")
    if entry.tensors:
        tensors, _ = read_header(path)
        for name, meta in entry.tensors.items():
            info = tensors.get(name)
            if info is None:
                raise ShardError(f"{entry.path}: tensor {name} is missing")
            if list(info.shape) != list(meta["shape"]) or info.dtype != meta["dtype"]:
                raise ShardError(f"{entry.path}: tensor {name} is {info.dtype}{list(info.shape)}, "
                                 f"manifest says {meta['dtype']}{meta['shape']}")
