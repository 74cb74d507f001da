"""The edge agent: what it does with each message. Messages arrive from its sockets' loop
(edge_agent/sockets.py) and are decoded and checked once (wire/messages.py); who may send
what is edge_agent/roles.py, the info it reports edge_agent/host.py, the emulated compute time
edge_agent/pacing.py, the warm-up and self-benchmark edge_agent/warm_up.py."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from common.errors import ShardError
from edge_agent.config import AgentConfig
from edge_agent.expert_math import expert_forward
from edge_agent.faults import FaultInjector
from edge_agent.host import agent_info
from edge_agent.pacing import paced_s, wait_out
from edge_agent.roles import DIALLED_ROLES, check_allowed, may_hint
from edge_agent.shard_reader import missing_experts
from edge_agent.shards import LoadedExperts, load_experts
from edge_agent.sockets import AgentSockets
from edge_agent.store import Pusher, ShardStore
from edge_agent.warm_up import self_benchmark, warm_up
from wire import messages as M
from wire import protocol as P
from wire.keys import ALL_ROLES, is_loopback_endpoint
from wire.peer_limits import LogTally

log = logging.getLogger("edge_agent")

ALIGN_BYTES = 64  # what torch's CPU allocator gives; what the BLAS kernels expect


class Agent:
    def __init__(self, config: AgentConfig, ready: Callable[[str], None] = print):
        self.config = config
        self.ready = ready
        self.loaded: LoadedExperts | None = None
        network = config.network
        self.store = ShardStore(
            config.store_dir, list(config.experts), accept_fingerprint=config.accept_fingerprint,
            trust_first_push=bool(network.bind) and is_loopback_endpoint(network.bind)) \
            if config.store_dir else None
        # what requests are checked against; the model's layers and size once loaded
        self.bounds = M.Bounds(network.sockets.max_message_bytes, tuple(config.experts))
        self._hint_log = LogTally()  # one log line per 10 s at most
        self.faults = FaultInjector(config.emulation.faults)
        self.throughput: dict = {}
        self.warm_up_s: float | None = None  # its experts' first run, before serving
        self.stop_requested = False
        self._zeros = b""
        # Answering in the request's frame is safe when the bytes crossed a kernel (tcp, ipc);
        # over inproc a zero-copy frame can be the sender's own tensor memory.
        self._answer_in_place = not any((e or "").startswith("inproc://")
                                        for e in (network.bind, network.basestation))
        self.sockets = AgentSockets(config, self.handle, self.info, self._pusher_gone,
                                    self._tick)

    # -- lifecycle ----------------------------------------------------------------------------

    def check_store(self) -> None:
        """Whether --store may serve as configured (see ShardStore.check_start). Raises
        ShardError."""
        if self.store is not None:
            self.store.check_start()

    def load(self, folder: str) -> None:
        """Raises ShardError (missing, corrupt, wrong shape)."""
        config = self.config
        self.loaded = load_experts(folder, list(config.experts), config.device, config.dtype,
                                   memory_budget_bytes=config.memory_budget_bytes,
                                   load_bytes_per_s=config.emulation.pace_load_bytes_per_s,
                                   prefetch_hints=config.prefetch_hints)
        self.bounds = dataclasses.replace(self.bounds, moe_layers=self.loaded.moe_layers,
                                          hidden=self.loaded.hidden_size)
        self.warm_up_s = warm_up(self.loaded)
        if config.self_benchmark:
            self.throughput = self_benchmark(self.loaded)

    def open_sockets(self) -> None:
        """Raises zmq.ZMQError when the bind address is taken or invalid."""
        self.sockets.open()

    def close(self) -> None:
        self.sockets.close()
        if self.loaded is not None and self.loaded.store is not None:
            self.loaded.store.close()
        if self.store:
            self.store.close()
        self.sockets.term()

    def where(self) -> str:
        return self.sockets.where()

    def announce_ready(self) -> None:
        loaded = self.loaded
        self.ready(f"edge_agent ready: {self.where()} experts "
                   f"{','.join(map(str, loaded.experts))} layers {loaded.num_layers} "
                   f"device {loaded.device} dtype {str(loaded.dtype).removeprefix('torch.')}")

    def run(self) -> None:
        """Serve until stop_requested (no per-request autograd state)."""
        with torch.inference_mode():
            self.sockets.run(lambda: self.stop_requested)

    def _tick(self, now_s: float) -> None:
        if self.store is not None:
            self.store.expire(now_s)

    def _pusher_gone(self, fd: int) -> None:
        if self.store is not None:
            self.store.pusher_gone(fd)

    # -- one message ------------------------------------------------------------------------

    def handle(self, body: list, roles: frozenset[str] = ALL_ROLES,
               sender: tuple | None = None) -> list | None:
        """Frames of one request -> frames of its reply (None: nothing to send). `roles`: what
        the sender's key may do (keys.ROLE_*); `sender`: (routing id frame, connection fd) on
        the bound socket, for a push."""
        if not body:
            log.warning("dropped an empty message")
            return None
        request_id = None
        try:
            P.check_frames(body, self.bounds.max_message_bytes)
            header = P.unpack(body[0])
            request_id = header["id"]
            return self.dispatch(header, body[1:], roles, sender)
        except P.ProtocolError as e:
            if request_id is None:
                request_id = P.request_id_of(body[0].buffer)
            log.info("bad request %s: %s: %s", request_id, e.code, e.message)
            return [P.error_header(request_id, e.code, e.message)]
        except Exception as e:  # a bug must not take the box down: report it and go on
            log.exception("internal error on request %s", request_id)
            return [P.error_header(request_id, P.ERR_INTERNAL,
                                   f"{type(e).__name__}: {str(e)[:P.MAX_ERROR_MESSAGE_CHARS]}")]

    def dispatch(self, header: dict, payload: list, roles: frozenset[str] = ALL_ROLES,
                 sender: tuple | None = None) -> list | None:
        """An unpacked request -> its reply frames. The sender's roles are checked before its
        fields, and the fault injector counts every expert request, well-formed or not."""
        kind = header["kind"]
        check_allowed(kind, roles)
        if kind == P.EXPERT:
            if not self.faults.before_expert():
                log.info("fault injection: dropped expert request %s", header["id"])
                return None
            if self.loaded is None:
                raise P.ProtocolError(P.ERR_NOT_READY, "no shard loaded yet (waiting for a push)")
            return self.expert(M.ExpertRequest.decode(header, payload, self.bounds), payload)
        if kind == P.PREFETCH:
            self.prefetch(header, payload, roles)
            return None
        if kind == P.PING:
            return self.ping(M.Ping.decode(header, payload, self.bounds))
        if kind == P.INFO:
            return [P.pack(P.INFO_REPLY, header["id"], info=self.info())]
        if kind in P.PUSH_KINDS:
            if self.store is None:
                raise P.ProtocolError(P.ERR_PUSH, "this agent was not started with --store DIR")
            return self.push(M.decode(header, payload, self.bounds), sender)
        raise P.ProtocolError(P.ERR_UNKNOWN_KIND, f"unknown message kind {P.shown(kind)}")

    def expert(self, request: M.ExpertRequest, payload: list) -> list:
        """Compute a checked request; `payload` its frames (frame 0 may carry the answer)."""
        loaded = self.loaded
        x, experts = request.x, request.experts
        # Answer in the request's own frame when the reply has its dtype and shape: no
        # allocation, and the frame goes back as an echo would (no copy, and no round trip
        # through pyzmq's garbage-collector thread, which a zero-copy send of a new buffer costs).
        in_place = request.x_is_view and request.reply_dtype == request.dtype \
            and self._answer_in_place
        start = time.perf_counter()
        store = loaded.store  # a budgeted box: loading what is not resident is part of the call
        compute_x = x  # a decoded tensor is on the CPU
        if x.dtype is not loaded.dtype or loaded.device.type != "cpu":
            compute_x = x.to(device=loaded.device, dtype=loaded.dtype)
        elif x.data_ptr() % ALIGN_BYTES:
            # a frame is only 8-byte aligned, and CPU matmuls round differently on unaligned
            # rows (measured): compute on an aligned copy so the bits are transformers' own
            compute_x = x.clone()
        out = x if in_place and compute_x is x else None  # CPU, same dtype: write straight in
        if store is not None:
            y = self._compute_budgeted(store, request, compute_x, out)
        elif len(experts) == 1:
            y = expert_forward(compute_x, loaded.weights[experts[0][0]][request.layer], out=out)
        else:
            parts, offset = [], 0
            for expert, tokens in experts:
                rows = slice(offset, offset + tokens)
                parts.append(expert_forward(compute_x[rows], loaded.weights[expert][request.layer],
                                            out=None if out is None else out[rows]))
                offset += tokens
            y = out if out is not None else torch.cat(parts)
        if in_place and y is not x:
            x.copy_(y)  # another device or dtype: one conversion, into the frame
        elif loaded.device.type == "cuda":
            y = y.cpu()  # includes the wait for the kernels
        compute_s = wait_out(start, time.perf_counter() - start,
                             paced_s(experts, self.config.emulation))
        if in_place:
            frames, fields = [payload[0]], {"dtype": request.dtype, "shape": request.shape}
        else:
            frames, fields = P.encode_tensor(y, request.reply_dtype)
        if store is not None:
            fields["cache"] = store.reply_fields()
        return [P.pack(P.EXPERT_REPLY, request.id, layer=request.layer, experts=experts,
                       compute_s=compute_s, **fields)] + frames

    def _compute_budgeted(self, store, request: M.ExpertRequest, x: torch.Tensor,
                          out: torch.Tensor | None) -> torch.Tensor:
        """A budgeted box computes one expert at a time, each loaded just before (within the
        budget and one unit: residency.ExpertStore.acquire_each)."""
        experts, carried = request.experts, request.prefetch
        parts, offset = [], 0
        units = store.acquire_each(request.layer, [expert for expert, _ in experts])
        try:
            for i, ((_, weights), (_, tokens)) in enumerate(zip(units, experts)):
                if i == len(experts) - 1 and carried is not None and store.takes_hints:
                    # the next layer's hint, carried by this request: taken once its units
                    # are in hand, so its load waits on storage while this request computes
                    self.prefetch(carried, (), DIALLED_ROLES)  # the sender may compute here
                rows = slice(offset, offset + tokens)
                parts.append(expert_forward(x[rows], weights,
                                            out=None if out is None else out[rows]))
                offset += tokens
                del weights  # evictable before the next one loads
        finally:
            units.close()
        if out is not None:
            return out
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def prefetch(self, fields, payload, roles: frozenset[str]) -> None:
        """A hint (PREFETCH's header, or an EXPERT's `prefetch` map): load these layer-experts
        in the background. Never answered, never raises: a hint from a key that may not
        compute, to a box without a budget, or garbled, is dropped (and logged, at most once
        per 10 s)."""
        store = self.loaded.store if self.loaded is not None else None
        try:
            hint = M.Prefetch.decode(fields, payload)
            if not may_hint(roles):
                raise P.ProtocolError(P.ERR_NOT_ALLOWED, "a key that may not compute")
            if store is not None:
                store.hint(hint.layer, hint.experts, hint.percent)
        except P.ProtocolError as e:
            self._hint_log.add(time.monotonic(), f"dropped a prefetch hint: {e.message}")
        except Exception:  # a bug must not take the box down, nor answer a hint
            log.exception("prefetch hint failed")

    def ping(self, ping: M.Ping) -> list:
        if ping.reply_bytes is None:
            return [P.pack(P.PONG, ping.id, bytes=sum(len(f.buffer) for f in ping.payload))] \
                + ping.payload
        if len(self._zeros) < ping.reply_bytes:
            self._zeros = bytes(ping.reply_bytes)
        data = memoryview(self._zeros)[:ping.reply_bytes]
        return [P.pack(P.PONG, ping.id, bytes=ping.reply_bytes), data]

    def info(self) -> dict:
        return agent_info(self.config, self.loaded, self.sockets.advertised,
                          self.store is not None, self.throughput, self.warm_up_s)

    def push(self, message: M.PushBegin | M.PushChunk | M.PushEnd, sender: tuple | None = None
             ) -> list:
        pusher = Pusher(sender[0].bytes, sender[1]) if sender else Pusher(b"")
        now_s = time.monotonic()
        if isinstance(message, M.PushBegin):
            self.sockets.router_events()  # a pusher that just left frees the store
            ack = self.store.begin(message, pusher, now_s)
        elif isinstance(message, M.PushChunk):
            ack = self.store.chunk(message, pusher, now_s)
        else:
            ack = self.store.end(message, pusher, now_s)
            if self.loaded is None and not missing_experts(self.store.folder,
                                                           list(self.config.experts)):
                try:
                    self.load(self.store.folder)
                except ShardError as e:
                    raise P.ProtocolError(P.ERR_PUSH, f"received, but loading failed: {e}") \
                        from None
                self.announce_ready()
                # re-announce with the model
                self.sockets.hello_pending = self.sockets.dealer is not None
            ack["serving"] = self.loaded is not None
        return [P.pack(P.PUSH_ACK, message.id, expert=message.expert, **ack)]
