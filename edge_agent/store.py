"""Receiving pushed shards (`edge_agent --store DIR`): checked before any byte is written,
resumable, sha256-checked, atomic.

Protocol (every step is answered with PUSH_ACK or ERROR):
    PUSH_BEGIN  expert, payload = manifest.json bytes, restart (optional: drop what is held)
                -> ack offset (bytes already held), prefix_sha256 (of those bytes, when > 0)
    PUSH_CHUNK  expert, offset, sha256 (of this chunk), payload = chunk bytes -> ack offset
    PUSH_END    expert -> ack complete (the file was checked and renamed into place)
The steps arrive decoded (wire/messages.py: the expert is one this store hosts, the frames
are there); what they say is checked here.
Nothing is written until the pusher may push (keys.ROLE_PUSH, checked by the server), the
expert is hosted here, the manifest is the model this store accepts and the declared size fits
the free disk. The model accepted: the store's own manifest.json when it holds one, else
`--accept-fingerprint`, else (loopback only, `trust_first_push`) the first model whose push
completes. manifest.json is written only then, after a shard was checked.
One push session at a time per store: it belongs to the pusher's connection and ends when that
closes, at PUSH_END, after PUSH_IDLE_S of silence, or once it has lasted PUSH_IDLE_S and moved
less than MIN_PUSH_BYTES_PER_S on average (a pusher that trickles cannot hold the store); chunks
from anyone else are refused, so a second connection cannot mix its bytes into a push.
A store that holds a model judges its files by its own manifest only, and never deletes a
shard at PUSH_BEGIN: a replacement takes its place by rename once it was checked. Declared
sizes are bounded by the tensors the model's config implies (shard_tool/shard_bounds.py).
The partial file `experts/expert-00q.safetensors.partial` and its `.partial.json` (which file
it is becoming) survive pusher and agent restarts, so an interrupted push resumes; the pusher
compares prefix_sha256 with its own file first, so bytes someone else staged are replaced, not
resumed.
A push that fails its checks leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace

from common.errors import ShardError
from common.staging import write_file_atomic
from shard_tool.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_file,
    expert_file_path,
    load_manifest,
    sha256_prefix,
)
from shard_tool.shard_bounds import check_declared_size
from wire import protocol as P
from wire.messages import PushBegin, PushChunk, PushEnd
from wire.protocol import ERR_PUSH, ProtocolError

log = logging.getLogger("edge_agent")

PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"
# A push silent this long is over and another pusher may start: a chunk of a few MiB crosses
# even a slow link faster, and the pusher waits 15 s per step by default.
PUSH_IDLE_S = 60.0
# ... and one that has lasted PUSH_IDLE_S must have moved this much per second on average
# (128 kbit/s: below any link a shard is pushed over; a trickle of 1 KiB per 5 s is 0.2 KiB/s).
# Its pusher then waits PUSH_IDLE_S before it may begin again, so others get the store.
MIN_PUSH_BYTES_PER_S = 16 * 1024
DISK_RESERVE_BYTES = 256 * 2**20  # a push never leaves less free space than this


@dataclass(frozen=True)
class Pusher:
    """Who pushes: the peer's routing id and its connection (ZMQ_SRCFD; None: not known)."""

    routing_id: bytes
    fd: int | None = None


@dataclass
class _Session:
    pusher: Pusher
    expert: int
    manifest: Manifest
    entry: FileEntry
    file: object | None  # the partial file, appending; None: the shard was already in place
    offset: int
    last_s: float  # time.monotonic() of its last step
    started_s: float = 0.0
    start_offset: int = 0  # bytes held when it began (a resume): not moved by this session


def session_over(session: _Session, now_s: float) -> str | None:
    """Why a push session is over at `now_s` (None: it goes on). Pure."""
    if now_s - session.last_s > PUSH_IDLE_S:
        return f"silent for {now_s - session.last_s:.0f} s"
    lasted_s = now_s - session.started_s
    moved = session.offset - session.start_offset
    if session.file is not None and lasted_s > PUSH_IDLE_S \
            and moved < MIN_PUSH_BYTES_PER_S * lasted_s:
        return (f"too slow: {moved} bytes in {lasted_s:.0f} s, under "
                f"{MIN_PUSH_BYTES_PER_S} bytes/s")
    return None


def _write_atomic(path: str, data: bytes) -> None:
    write_file_atomic(path, data, durable=True)


def _fsync_dir(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _refuse(message: str) -> ProtocolError:
    return ProtocolError(ERR_PUSH, message)


def fingerprint_matches(fingerprint: str, accepted: str) -> bool:
    """`accepted`: a whole fingerprint or its start (`shard_tool split` prints 16 characters)."""
    return fingerprint.startswith(accepted.lower())


class ShardStore:
    def __init__(self, folder: str, experts: list[int], accept_fingerprint: str | None = None,
                 trust_first_push: bool = False):
        self.folder = folder
        self.experts = list(experts)
        self.accept_fingerprint = accept_fingerprint.lower() if accept_fingerprint else None
        # loopback only (the server decides): with no model yet, the first one pushed whole
        self.trust_first_push = trust_first_push
        self.session: _Session | None = None
        self._slow: tuple[Pusher, float] | None = None  # a pusher cut for slowness, until when
        os.makedirs(os.path.join(folder, "experts"), exist_ok=True)

    def check_start(self) -> None:
        """Whether the store may serve as configured; drops partial files of another model
        than the one it holds. Raises ShardError (one line for the user)."""
        held = self.held_manifest()
        if held is None:
            if not self.accept_fingerprint and not self.trust_first_push:
                raise ShardError(
                    f"--store {self.folder} holds no model yet: pass --accept-fingerprint FP "
                    "(the fingerprint `shard_tool split` printed) so that only that model can "
                    "be pushed (only an agent on a loopback --bind takes the first one without)")
            return
        if self.accept_fingerprint and not fingerprint_matches(held.fingerprint,
                                                               self.accept_fingerprint):
            raise ShardError(f"--store {self.folder} holds model {held.fingerprint[:16]}, not "
                             f"{self.accept_fingerprint[:16]} (--accept-fingerprint); empty it "
                             "to take another model")
        self._drop_foreign_partials(held)

    def held_manifest(self) -> Manifest | None:
        if not os.path.exists(os.path.join(self.folder, MANIFEST_NAME)):
            return None
        try:
            return load_manifest(self.folder)
        except ShardError as e:
            log.warning("store: ignoring unreadable manifest: %s", e)
            return None

    def _check_model(self, manifest: Manifest, held: Manifest | None) -> None:
        """Raises ProtocolError unless this store (holding `held`) takes `manifest`'s model."""
        if held is not None:
            if held.fingerprint != manifest.fingerprint:
                raise _refuse(
                    f"different model: this agent's store holds model {held.fingerprint[:16]}, "
                    f"the push is model {manifest.fingerprint[:16]}; empty {self.folder} to "
                    "replace it")
        elif self.accept_fingerprint:
            if not fingerprint_matches(manifest.fingerprint, self.accept_fingerprint):
                raise _refuse(f"this agent accepts model {self.accept_fingerprint[:16]} "
                              f"(--accept-fingerprint), the push is model "
                              f"{manifest.fingerprint[:16]}")
        elif not self.trust_first_push:
            raise _refuse("this agent accepts no model (start it with --accept-fingerprint FP)")

    # -- sessions -----------------------------------------------------------------------------

    def _own_session(self, pusher: Pusher, expert: int, now: float) -> _Session:
        """The caller's push of `expert`. Raises ProtocolError."""
        session = self.session
        if session is None or session.pusher != pusher or session.expert != expert:
            held_by = "; another pusher holds the store" if session is not None \
                and session.pusher != pusher else ""
            raise _refuse(f"no push of expert {expert} in progress from this pusher (send "
                          f"push_begin first{held_by})")
        session.last_s = now
        return session

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is not None and session.file is not None:
            session.file.close()

    def pusher_gone(self, fd: int) -> None:
        """Connection `fd` closed: the push it held is over (its bytes stay for a resume)."""
        if self.session is not None and self.session.pusher.fd == fd:
            log.info("store: the pusher of expert %d left at %d of %d bytes",
                     self.session.expert, self.session.offset, self.session.entry.bytes)
            self._end_session()

    def expire(self, now: float) -> None:
        """End a push that is over (session_over); its bytes stay for a resume."""
        session = self.session
        why = session_over(session, now) if session is not None else None
        if why is None:
            return
        log.info("store: the push of expert %d ended at %d of %d bytes: %s", session.expert,
                 session.offset, session.entry.bytes, why)
        if session.file is not None and now - session.last_s <= PUSH_IDLE_S:
            self._slow = (session.pusher, now + PUSH_IDLE_S)  # others get a turn first
        self._end_session()

    # -- the three steps --------------------------------------------------------------------

    def begin(self, message: PushBegin, pusher: Pusher = Pusher(b""), now: float = 0.0
              ) -> dict:
        """Start or resume a push (a decoded PUSH_BEGIN: its expert is one of this store's).
        Writes nothing unless every check passes. Raises ProtocolError(ERR_PUSH) with a
        user-facing reason."""
        expert = message.expert
        self.expire(now)
        if self._slow is not None and self._slow[0] == pusher and now < self._slow[1]:
            raise _refuse(f"this pusher's last push was too slow (under {MIN_PUSH_BYTES_PER_S} "
                          f"bytes/s); it may begin again in {self._slow[1] - now:.0f} s")
        if self.session is not None and self.session.pusher != pusher:
            session = self.session
            raise _refuse(f"another push (expert {session.expert}, {session.offset} of "
                          f"{session.entry.bytes} bytes) is in progress here; try again when "
                          f"it ends (at most {PUSH_IDLE_S:.0f} s after its last chunk)")
        try:
            manifest = Manifest.from_json(json.loads(message.manifest))
            manifest.expert_file(expert)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _refuse("the pushed manifest is not JSON") from None
        except (ShardError, AttributeError, TypeError, KeyError, OverflowError) as e:
            # from_json lets a few through on odd values ("bytes": Infinity, a list of paths)
            raise _refuse(f"the pushed manifest is invalid: {str(e)[:200]}") from None
        held = self.held_manifest()
        self._check_model(manifest, held)
        # a store that holds a model acts on its own manifest (the same fingerprint: the same
        # fields), never on what a pusher sent
        manifest = held or manifest
        entry = manifest.expert_file(expert)
        if entry.path != expert_file_path(expert):  # nowhere else: not over another file
            raise _refuse(f"the manifest puts expert {expert} at {P.shown(entry.path)}, not "
                          f"{expert_file_path(expert)}")
        if entry.bytes < 0 or not isinstance(entry.sha256, str):
            raise _refuse(f"the manifest's entry for expert {expert} is malformed")
        try:
            check_declared_size(manifest, entry)
        except (ShardError, AttributeError, TypeError, ValueError, KeyError) as e:
            raise _refuse(f"the pushed manifest is invalid: {str(e)[:200]}") from None
        final = os.path.join(self.folder, entry.path)
        partial, sidecar = final + PARTIAL_SUFFIX, final + SIDECAR_SUFFIX
        target = {"sha256": entry.sha256, "bytes": entry.bytes}
        in_place = False
        if os.path.exists(final):
            try:
                check_file(self.folder, entry)
                in_place = True
            except ShardError as e:  # a corrupt copy: replaced by rename once the push checks
                log.warning("store: expert %d's shard will be replaced: %s", expert, e)
        offset = 0 if in_place or message.restart else \
            self._held_offset(partial, sidecar, target)
        if not in_place:
            need, free = entry.bytes - offset, shutil.disk_usage(self.folder).free
            if need > free - DISK_RESERVE_BYTES:
                raise _refuse(f"expert {expert}'s shard needs {need} more bytes; {free} are "
                              f"free in {self.folder} and {DISK_RESERVE_BYTES} stay free")
        self._end_session()  # this pusher starting again
        if in_place:
            self.session = _Session(pusher, expert, manifest, entry, None, entry.bytes, now, now,
                                    entry.bytes)
            return {"offset": entry.bytes, "bytes": entry.bytes, "complete": True}
        if offset == 0:
            _write_atomic(sidecar, json.dumps(target).encode())
        file = open(partial, "r+b" if offset else "wb")
        file.truncate(offset)
        file.seek(offset)
        self.session = _Session(pusher, expert, manifest, entry, file, offset, now, now, offset)
        ack = {"offset": offset, "bytes": entry.bytes, "complete": False}
        if offset:
            log.info("store: resuming expert %d at %d of %d bytes", expert, offset, entry.bytes)
            ack["prefix_sha256"] = sha256_prefix(partial, offset)
        return ack

    @staticmethod
    def _held_offset(partial: str, sidecar: str, target: dict) -> int:
        """Bytes of the partial file that a resume keeps (0: none, or another target)."""
        try:
            with open(sidecar) as f:
                if json.load(f) == target and os.path.exists(partial):
                    offset = os.path.getsize(partial)
                    return offset if offset <= target["bytes"] else 0
        except (OSError, ValueError):
            pass
        return 0

    def chunk(self, message: PushChunk, pusher: Pusher = Pusher(b""), now: float = 0.0
              ) -> dict:
        """Append one verified chunk (a decoded PUSH_CHUNK). Raises ProtocolError(ERR_PUSH)."""
        expert, offset, digest, data = message.expert, message.offset, message.sha256, \
            message.data
        session = self._own_session(pusher, expert, now)
        if offset != session.offset or session.file is None:
            return {"offset": session.offset, "bytes": session.entry.bytes}  # pusher seeks here
        if offset + len(data) > session.entry.bytes:
            raise _refuse(f"chunk at {offset} runs past the end of the file "
                          f"({session.entry.bytes} bytes)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise _refuse(f"chunk at offset {offset} of expert {expert} is corrupted (sha256 "
                          "mismatch); refused")
        session.file.write(data)
        session.offset += len(data)
        return {"offset": session.offset, "bytes": session.entry.bytes}

    def end(self, message: PushEnd, pusher: Pusher = Pusher(b""), now: float = 0.0) -> dict:
        """Check the whole file against the manifest and rename it into place (a decoded
        PUSH_END); the first shard of a model also writes its manifest.json.

        Raises ProtocolError(ERR_PUSH); a file that fails the check is discarded.
        """
        expert = message.expert
        session = self._own_session(pusher, expert, now)
        entry = session.entry
        done = {"complete": True, "offset": entry.bytes, "bytes": entry.bytes}
        self.session = None
        if session.file is None:  # already in place before this push
            self._hold(session.manifest)
            return done
        session.file.flush()
        os.fsync(session.file.fileno())
        session.file.close()
        final = os.path.join(self.folder, entry.path)
        if session.offset != entry.bytes:
            raise _refuse(f"expert {expert}: push ended at {session.offset} of {entry.bytes} "
                          "bytes; push again to resume")
        try:
            check_file(self.folder, replace(entry, path=entry.path + PARTIAL_SUFFIX))
        except ShardError as e:
            self._drop_partial(final)
            raise _refuse(f"expert {expert}: the received shard failed its check ({e}); "
                          "discarded, push again") from None
        os.replace(final + PARTIAL_SUFFIX, final)  # atomic: a reader sees all of it or none
        os.remove(final + SIDECAR_SUFFIX)
        _fsync_dir(os.path.dirname(final))
        log.info("store: expert %d received and checked (%d bytes)", expert, entry.bytes)
        self._hold(session.manifest)
        return done

    def _hold(self, manifest: Manifest) -> None:
        """A checked shard of `manifest` is in place: the store holds that model from now on."""
        if self.held_manifest() is not None:
            return
        _write_atomic(os.path.join(self.folder, MANIFEST_NAME),
                      json.dumps(manifest.to_json(), indent=1).encode())
        _fsync_dir(self.folder)
        log.info("store: holds model %s from now on", manifest.fingerprint[:16])
        self._drop_foreign_partials(manifest)

    def _drop_partial(self, final: str) -> None:
        for path in (final + PARTIAL_SUFFIX, final + SIDECAR_SUFFIX):
            if os.path.exists(path):
                os.remove(path)

    def _drop_foreign_partials(self, manifest: Manifest) -> None:
        """Partial files that are not becoming `manifest`'s shards (another model pushed in
        part before this one was taken) are of no use: removed."""
        for expert in self.experts:
            final = os.path.join(self.folder, expert_file_path(expert))
            try:
                entry = manifest.expert_file(expert)
                target = {"sha256": entry.sha256, "bytes": entry.bytes}
            except ShardError:
                target = None
            if os.path.exists(final + PARTIAL_SUFFIX) and (
                    target is None or self._held_offset(final + PARTIAL_SUFFIX,
                                                        final + SIDECAR_SUFFIX, target) == 0):
                log.info("store: removing expert %d's partial file of another model", expert)
                self._drop_partial(final)

    def close(self) -> None:
        self._end_session()
