"""Receiving pushed shards (`edge_agent --store DIR`): resumable, sha256-checked, atomic.

Protocol (one pusher at a time per expert; every step is answered with PUSH_ACK or ERROR):
    PUSH_BEGIN  expert, payload = manifest.json bytes  -> ack offset (bytes already held)
    PUSH_CHUNK  expert, offset, sha256 (of this chunk), payload = chunk bytes -> ack offset
    PUSH_END    expert -> ack complete (the file was checked and renamed into place)
The partial file `experts/expert-00q.safetensors.partial` and its `.partial.json` (which file
it is becoming) survive pusher and agent restarts, so an interrupted push resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace

from edge_agent.protocol import ERR_PUSH, ProtocolError
from shard_tool.errors import ShardError
from shard_tool.manifest import MANIFEST_NAME, FileEntry, Manifest, check_file, load_manifest

log = logging.getLogger("edge_agent")

PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"


@dataclass
class _Upload:
    entry: FileEntry
    file: object  # open binary file, appending
    offset: int


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _refuse(message: str) -> ProtocolError:
    return ProtocolError(ERR_PUSH, message)


class ShardStore:
    def __init__(self, folder: str, experts: list[int]):
        self.folder = folder
        self.experts = list(experts)
        self.uploads: dict[int, _Upload] = {}
        os.makedirs(os.path.join(folder, "experts"), exist_ok=True)

    def held_manifest(self) -> Manifest | None:
        if not os.path.exists(os.path.join(self.folder, MANIFEST_NAME)):
            return None
        try:
            return load_manifest(self.folder)
        except ShardError as e:
            log.warning("store: ignoring unreadable manifest: %s", e)
            return None

    def _expert(self, header: dict) -> int:
        expert = header.get("expert")
        if not isinstance(expert, int) or expert not in self.experts:
            raise _refuse(f"this agent hosts experts {self.experts}, not {expert!r}")
        return expert

    def begin(self, header: dict, payload: list) -> dict:
        """Start or resume a push. Raises ProtocolError(ERR_PUSH) with a user-facing reason."""
        expert = self._expert(header)
        if len(payload) != 1:
            raise _refuse("push_begin carries the manifest as one frame")
        try:
            manifest = Manifest.from_json(json.loads(bytes(payload[0].buffer)))
            entry = manifest.expert_file(expert)
        except (ValueError, UnicodeDecodeError):
            raise _refuse("the pushed manifest is not JSON") from None
        except ShardError as e:
            raise _refuse(f"the pushed manifest is invalid: {e}") from None
        held = self.held_manifest()
        if held is not None and held.fingerprint != manifest.fingerprint:
            raise _refuse(
                f"different model: this agent's store holds model {held.fingerprint[:12]}, the "
                f"push is model {manifest.fingerprint[:12]}; empty {self.folder} to replace it")
        if held is None:
            _write_atomic(os.path.join(self.folder, MANIFEST_NAME),
                          json.dumps(manifest.to_json(), indent=1).encode())
        old = self.uploads.pop(expert, None)
        if old is not None:
            old.file.close()
        final = os.path.join(self.folder, entry.path)
        if os.path.exists(final):
            try:
                check_file(self.folder, entry)
                self.uploads[expert] = _Upload(entry, None, entry.bytes)
                return {"offset": entry.bytes, "bytes": entry.bytes, "complete": True}
            except ShardError as e:  # a corrupt copy in place: replace it
                log.warning("store: replacing expert %d's shard: %s", expert, e)
                os.remove(final)
        partial, sidecar = final + PARTIAL_SUFFIX, final + SIDECAR_SUFFIX
        target = {"sha256": entry.sha256, "bytes": entry.bytes}
        offset = 0
        try:
            with open(sidecar) as f:
                if json.load(f) == target and os.path.exists(partial):
                    offset = os.path.getsize(partial)
        except (OSError, ValueError):
            pass
        if offset > entry.bytes:
            offset = 0
        if offset == 0:
            _write_atomic(sidecar, json.dumps(target).encode())
        file = open(partial, "r+b" if offset else "wb")
        file.truncate(offset)
        file.seek(offset)
        self.uploads[expert] = _Upload(entry, file, offset)
        if offset:
            log.info("store: resuming expert %d at %d of %d bytes", expert, offset, entry.bytes)
        return {"offset": offset, "bytes": entry.bytes, "complete": False}

    def _upload(self, expert: int) -> _Upload:
        upload = self.uploads.get(expert)
        if upload is None:
            raise _refuse(f"no push in progress for expert {expert} (send push_begin first)")
        return upload

    def chunk(self, header: dict, payload: list) -> dict:
        """Append one verified chunk. Raises ProtocolError(ERR_PUSH)."""
        expert = self._expert(header)
        upload = self._upload(expert)
        offset, digest = header.get("offset"), header.get("sha256")
        if len(payload) != 1 or not isinstance(offset, int) or not isinstance(digest, str):
            raise _refuse("push_chunk needs offset, sha256 and one data frame")
        if offset != upload.offset or upload.file is None:
            return {"offset": upload.offset, "bytes": upload.entry.bytes}  # pusher seeks here
        data = payload[0].buffer
        if offset + len(data) > upload.entry.bytes:
            raise _refuse(f"chunk at {offset} runs past the end of the file "
                          f"({upload.entry.bytes} bytes)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise _refuse(f"chunk at offset {offset} of expert {expert} is corrupted (sha256 "
                          "mismatch); refused")
        upload.file.write(data)
        upload.offset += len(data)
        return {"offset": upload.offset, "bytes": upload.entry.bytes}

    def end(self, header: dict) -> dict:
        """Check the whole file against the manifest and rename it into place.

        Raises ProtocolError(ERR_PUSH); a file that fails the check is discarded.
        """
        expert = self._expert(header)
        upload = self._upload(expert)
        entry = upload.entry
        final = os.path.join(self.folder, entry.path)
        if upload.file is None:  # already complete before this push
            del self.uploads[expert]
            return {"complete": True, "offset": entry.bytes, "bytes": entry.bytes}
        upload.file.flush()
        os.fsync(upload.file.fileno())
        upload.file.close()
        del self.uploads[expert]
        if upload.offset != entry.bytes:
            raise _refuse(f"expert {expert}: push ended at {upload.offset} of {entry.bytes} "
                          "bytes; push again to resume")
        try:
            check_file(self.folder, replace(entry, path=entry.path + PARTIAL_SUFFIX))
        except ShardError as e:
            for path in (final + PARTIAL_SUFFIX, final + SIDECAR_SUFFIX):
                if os.path.exists(path):
                    os.remove(path)
            raise _refuse(f"expert {expert}: the received shard failed its check ({e}); "
                          "discarded, push again") from None
        os.replace(final + PARTIAL_SUFFIX, final)  # atomic: a reader sees all of it or none
        os.remove(final + SIDECAR_SUFFIX)
        dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("store: expert %d received and checked (%d bytes)", expert, entry.bytes)
        return {"complete": True, "offset": entry.bytes, "bytes": entry.bytes}

    def close(self) -> None:
        for upload in self.uploads.values():
            if upload.file is not None:
                upload.file.close()
        self.uploads.clear()

