"""`shard_tool push OUT --expert 3 --to tcp://HOST:PORT`: send expert shards to an edge agent.

The agent must run with `--store DIR` (and, beyond loopback, `--accept-fingerprint` of this
model). The shard goes in chunks, each with its sha256; the agent keeps what it received, so a
push that was interrupted resumes where it stopped, once the sha256 of what the agent holds
matches this file's start (else it starts over). The agent checks the whole file against the
manifest, renames it into place and starts serving.
The wire protocol is the agent's (wire/protocol.py, edge_agent/store.py).
To an agent with `--keys`: `--keys DIR` (the pusher's keypair, from `basestation keygen` or
`edge_agent keygen`; its .key must be in the agent's pushers/ folder) and `--agent-key` (the
agent's public key or .key file).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from common.errors import ShardError
from shard_tool.manifest import MANIFEST_NAME, check_size, load_manifest, sha256_prefix

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # a few MiB: small enough for HWM/size caps, big enough
DEFAULT_TIMEOUT_S = 15.0  # per chunk; raise it for slow links
END_CHECK_BYTES_PER_S = 50e6  # the agent re-hashes the shard before it answers the last step


@dataclass(frozen=True)
class PushResult:
    expert: int
    bytes: int
    resumed_from: int  # bytes the agent already held
    sent_bytes: int
    serving: bool  # the agent has loaded all its experts and serves


@dataclass(frozen=True)
class PushFaults:
    """Fault injection for tests: stop after N chunks, or flip a byte of chunk N (0-based)."""

    stop_after_chunks: int | None = None
    corrupt_chunk: int | None = None


def push(src: str, expert: int, to: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool | None = None,
         faults: PushFaults = PushFaults(), keypair=None, agent_key: bytes | None = None
         ) -> PushResult:
    """Push expert `expert`'s shard of split folder `src` to the agent at `to`; over CurveZMQ
    when given this pusher's `keypair` (wire.keys.Keypair) and the agent's public key.

    Raises ShardError: bad split folder, agent unreachable or silent, push refused.
    """
    from wire import messages as M
    from wire import protocol as P
    from wire.client import AgentClient, AgentError, PeerUnreachable

    manifest = load_manifest(src)
    entry = manifest.expert_file(expert)
    path = check_size(src, entry)
    with open(os.path.join(src, MANIFEST_NAME), "rb") as f:
        manifest_bytes = f.read()
    if progress is None:
        progress = sys.stderr.isatty()

    if (keypair is None) != (agent_key is None):
        raise ShardError("a keyed push needs both this pusher's keys and the agent's public key")
    client = AgentClient(sockets=P.SocketConfig(max_message_bytes=chunk_bytes + (1 << 20)),
                         keypair=keypair)
    peer = client.connect(to, server_key=agent_key)

    def step(kind: str, frames: list, step_timeout_s: float, **fields) -> M.PushAck:
        """One step's ack. Raises TimeoutError, PeerUnreachable, AgentError, ProtocolError."""
        reply = client.call(peer, kind, frames, timeout_s=step_timeout_s, expert=expert,
                            **fields)
        if reply.kind != P.PUSH_ACK:
            raise P.ProtocolError(P.ERR_MALFORMED, f"a {P.shown(reply.kind)} reply to {kind}")
        return reply.message

    bar = None
    try:
        # the agent may check the shard it holds, or hash the part a resume would keep
        begin_timeout_s = timeout_s + entry.bytes / END_CHECK_BYTES_PER_S
        ack = step(P.PUSH_BEGIN, [manifest_bytes], begin_timeout_s)
        offset = ack.offset
        held = ack.prefix_sha256  # agents before issue #13 do not send it
        if offset and not ack.complete and held is not None \
                and held != sha256_prefix(path, offset):
            # bytes someone else staged (another pusher's interrupted push): not ours to resume
            ack = step(P.PUSH_BEGIN, [manifest_bytes], begin_timeout_s, restart=True)
            offset = ack.offset
        resumed_from = offset
        sent = chunks = 0
        from tqdm import tqdm

        bar = tqdm(total=entry.bytes, initial=offset, unit="B", unit_scale=True,
                   desc=f"expert {expert}", disable=not progress, file=sys.stderr)
        with open(path, "rb") as f:
            while offset < entry.bytes:
                if faults.stop_after_chunks is not None and chunks >= faults.stop_after_chunks:
                    raise ShardError(f"push interrupted after {chunks} chunks (fault injection)")
                f.seek(offset)
                data = f.read(min(chunk_bytes, entry.bytes - offset))
                digest = hashlib.sha256(data).hexdigest()
                if faults.corrupt_chunk == chunks:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                new_offset = step(P.PUSH_CHUNK, [data], timeout_s, offset=offset,
                                  sha256=digest).offset
                bar.update(new_offset - offset)
                sent += len(data) if new_offset == offset + len(data) else 0
                offset = new_offset  # the agent says where it is; it may ask us to go back
                chunks += 1
        ack = step(P.PUSH_END, [], timeout_s + entry.bytes / END_CHECK_BYTES_PER_S)
        return PushResult(expert=expert, bytes=entry.bytes, resumed_from=resumed_from,
                          sent_bytes=sent, serving=ack.serving)
    except AgentError as e:
        raise ShardError(f"push refused by the agent at {to}: {e.message}") from None
    except P.ProtocolError as e:
        raise ShardError(f"the agent at {to} answered the push with a malformed ack: "
                         f"{e.message}") from None
    except (TimeoutError, PeerUnreachable):
        raise ShardError(f"{to}: no answer within {timeout_s} s (is `edge_agent --store` "
                         "running there, and, if it has --keys, is this pusher's key in its "
                         "pushers/ and --agent-key its key?)") from None
    finally:
        if bar is not None:
            bar.close()
        client.close()


def cmd_push(args) -> int:
    from common.expert_ids import parse_expert_ids

    try:
        experts = parse_expert_ids(args.expert)
    except ValueError as e:
        raise ShardError(f"--expert {e}") from None
    faults = PushFaults(stop_after_chunks=args.fault_stop_after_chunks,
                        corrupt_chunk=args.fault_corrupt_chunk)
    keypair, agent_key = _push_keys(args.keys, args.agent_key)
    for expert in experts:
        result = push(args.out, expert, args.to, chunk_bytes=int(args.chunk_mb * 2**20),
                      timeout_s=args.timeout_s, faults=faults, keypair=keypair,
                      agent_key=agent_key)
        resumed = f", resumed at {result.resumed_from} bytes" if result.resumed_from else ""
        print(f"pushed expert {expert} to {args.to}: {result.bytes} bytes{resumed}; agent "
              f"{'serving' if result.serving else 'waiting for its other experts'}", flush=True)
    return 0


def _push_keys(keys_dir: str | None, agent_key: str | None):
    """--keys and --agent-key -> (Keypair, agent's public key), or (None, None) for a plain
    push. Raises ShardError."""
    from wire.keys import KeysError, load_keypair, public_key_arg

    if keys_dir is None and agent_key is None:
        return None, None
    if keys_dir is None or agent_key is None:
        raise ShardError("--keys DIR and --agent-key KEY go together (this pusher's keypair, "
                         "the agent's public key)")
    try:
        return load_keypair(keys_dir, "basestation"), public_key_arg(agent_key)
    except KeysError as e:
        raise ShardError(str(e)) from None


def add_parser(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("push", help="send expert shards to an edge agent (--store)")
    p.add_argument("out", help="split folder (manifest.json + experts/)")
    p.add_argument("--expert", required=True, help="expert ids: 3, 0,3 or 0-3")
    p.add_argument("--to", required=True, metavar="tcp://HOST:PORT",
                   help="the agent's --bind address")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ: this pusher's keypair (from "
                   "`basestation keygen DIR` or `edge_agent keygen DIR`); its .key must be in "
                   "the agent's pushers/ folder")
    p.add_argument("--agent-key", metavar="KEY|FILE",
                   help="with --keys: the agent's public key (Z85) or its .key certificate")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20)
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="deadline for each step's answer")
    p.add_argument("--fault-stop-after-chunks", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fault-corrupt-chunk", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_push)
