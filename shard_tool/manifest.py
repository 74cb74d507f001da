"""manifest.json: what a split wrote, owned here and imported by agent and base station.

Layout of a split folder (OUT):
    manifest.json
    basestation/model.safetensors   every tensor but the routed experts (routers, shared
                                    experts and dense MLPs included), checkpoint names kept
    basestation/config.json, generation_config.json, tokenizer files
    experts/expert-003.safetensors  routed expert 3 of every MoE layer (fused tensors sliced;
                                    names in shard_tool/families.py)

An edge box holds manifest.json and its own expert file(s) only; checks cover what is present
and what is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from shard_tool.errors import ShardError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BASESTATION_DIR = "basestation"
EXPERTS_DIR = "experts"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def expert_file_path(expert: int) -> str:
    return f"{EXPERTS_DIR}/expert-{expert:03d}.safetensors"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the split folder, '/'-separated
    role: str  # "basestation" | "expert"
    bytes: int
    sha256: str
    expert: int | None = None
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape}

    def to_json(self) -> dict:
        out = {"path": self.path, "role": self.role, "bytes": self.bytes, "sha256": self.sha256}
        if self.expert is not None:
            out["expert"] = self.expert
        if self.tensors:
            out["tensors"] = self.tensors
        return out


@dataclass(frozen=True)
class Manifest:
    family: str
    model: dict  # ModelShape.summary() (families.py) plus "dtype"
    files: tuple[FileEntry, ...]
    tool_version: str = "0"
    format_version: int = FORMAT_VERSION

    @property
    def fingerprint(self) -> str:
        """Identifies the model and its bytes: agents and base station must agree on it."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.family, self.model], sort_keys=True).encode())
        for entry in sorted(self.files, key=lambda e: e.path):
            digest.update(f"{entry.path}:{entry.sha256}\n".encode())
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
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"manifest format {data.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}; re-split with this version of shard_tool")
        try:
            files = tuple(FileEntry(path=f["path"], role=f["role"], bytes=int(f["bytes"]),
                                    sha256=f["sha256"], expert=f.get("expert"),
                                    tensors=f.get("tensors", {})) for f in data["files"])
            manifest = cls(family=data["family"], model=dict(data["model"]), files=files,
                           tool_version=data.get("tool_version", "0"))
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"manifest is malformed: {e}") from None
        if data.get("fingerprint") != manifest.fingerprint:
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
