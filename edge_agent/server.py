"""The agent's sockets and serving loop: one request at a time, synchronous (design.md)."""

from __future__ import annotations

import logging
import math
import os
import platform
import socket as pysocket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zmq
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from wire import protocol as P
from edge_agent.expert_math import expert_forward, flops_per_token
from edge_agent.faults import FaultConfig, FaultInjector
from wire.keys import (
    ALL_ROLES,
    ROLE_COMPUTE,
    ROLE_PUSH,
    KeyFolder,
    is_loopback_endpoint,
    peer_public_key,
    set_curve_client,
    set_curve_server,
    start_authenticator,
)
from wire.peer_limits import CHECK_INTERVAL_S, LogTally, PeerGuard, PeerLimits
from edge_agent.shards import LoadedExperts, load_experts, missing_experts
from edge_agent.store import Pusher, ShardStore
from common.errors import ShardError

log = logging.getLogger("edge_agent")

POLL_INTERVAL_S = 0.1  # how often the loop looks at the stop flag and pending announcements
BENCH_TOKENS = 64
BENCH_BUDGET_S = 0.3  # the self-benchmark at start stays short
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_CLOSED)
# The base station this agent dials in to may compute (with keys CURVE checked its public
# key); shards are pushed to the bound socket only, where the store knows who pushes.
DIALLED_ROLES = frozenset({ROLE_COMPUTE})


ALIGN_BYTES = 64  # what torch's CPU allocator gives; what the BLAS kernels expect


@dataclass(frozen=True)
class AgentConfig:
    experts: tuple[int, ...]
    shards_dir: str | None = None  # --shards: must hold the shards now
    store_dir: str | None = None  # --store: waits for pushed shards
    bind: str | None = None  # listening mode
    basestation: str | None = None  # dial-in mode
    advertise: str | None = None
    agent_id: str | None = None  # dial-in routing id; default from host name and experts
    device: str = "auto"
    dtype: str = "auto"
    self_benchmark: bool = True
    sockets: P.SocketConfig = field(default_factory=P.SocketConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    # emulation (off at 0): each (token, expert) takes at least this long, as an emulated
    # model's expert would on an emulated device (the paper's Eq. 4 / C_q; testbed sets it)
    pace_s_per_token: float = 0.0
    # ... and each expert call at least this long whatever its tokens (reading the expert's
    # weights once: a roofline, max(per call, tokens x per token), per expert in a request)
    pace_s_per_call: float = 0.0
    keys: KeyFolder | None = None  # --keys: CURVE on every socket, peers by public key
    basestation_key: bytes | None = None  # with keys and dial-in: the base station's public key
    # --accept-fingerprint: the model --store takes pushes of (None: the one it holds, or on a
    # loopback --bind with none held the first one pushed whole; see store.py)
    accept_fingerprint: str | None = None
    limits: PeerLimits | None = None  # the bound socket's per-peer limits; None: from sockets
    # --memory-budget: bytes of layer-experts kept in memory, the rest loaded on demand or on a
    # hint (shards.ExpertStore); None: every layer-expert resident, loaded at start
    memory_budget_bytes: int | None = None
    # emulation (off at 0): with a budget, a layer-expert loaded after the start takes at least
    # its shard bytes / this (the storage of a small box: SD card, eMMC)
    pace_load_bytes_per_s: float = 0.0
    # take prefetch hints: auto (while loads wait on storage, shards.HINT_LOAD_RATIO), on, off
    prefetch_hints: str = "auto"


def default_agent_id(experts: tuple[int, ...]) -> str:
    return f"edge-{pysocket.gethostname()}-e{','.join(map(str, experts))}"


def advertise_address(endpoint: str) -> str:
    """The address others reach a bound endpoint on: a wildcard host becomes this box's IPv4
    address on the default route's interface (netifaces), else the first non-loopback one."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if host not in ("0.0.0.0", "*", "[::]", "::"):
        return endpoint
    try:
        import netifaces

        candidates = []
        default = netifaces.gateways().get("default", {}).get(netifaces.AF_INET)
        if default:
            candidates.append(default[1])
        candidates += [i for i in netifaces.interfaces() if i not in candidates]
        for name in candidates:
            for addr in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
                ip = addr.get("addr", "")
                if ip and not ip.startswith("127."):
                    return f"tcp://{ip}:{port}"
    except Exception as e:  # noqa: BLE001 (no netifaces, an odd interface: fall back, say why)
        log.debug("advertise: netifaces failed: %s", e)
    return f"tcp://127.0.0.1:{port}"


def device_facts(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return {"device": str(device), "device_name": props.name, "memory_bytes": total,
                "memory_free_bytes": free}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"device": "cpu", "device_name": name, "memory_bytes": memory,
            "threads": torch.get_num_threads()}


def self_benchmark(loaded: LoadedExperts) -> dict:
    """Measured expert throughput of this box (tokens/s and FLOP/s of one expert FFN)."""
    weights = loaded.sample_weights()
    x = torch.randn(BENCH_TOKENS, loaded.hidden_size, device=loaded.device, dtype=loaded.dtype)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    expert_forward(x, weights)  # warm-up
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        expert_forward(x, weights)
        runs += 1
        sync()
        elapsed_s = time.perf_counter() - start
        if elapsed_s >= BENCH_BUDGET_S or runs >= 200:
            break
    tokens_per_s = runs * BENCH_TOKENS / elapsed_s
    return {"tokens_per_s": tokens_per_s, "batch_tokens": BENCH_TOKENS,
            "flop_per_s": tokens_per_s * flops_per_token(loaded.hidden_size, loaded.ffn_size)}


WARM_UP_TOKENS = (1, 16)  # a decode step's shape and a prefill's: different kernels


def warm_up(loaded: LoadedExperts) -> float:
    """Run every expert this box serves once, at every layer, at both shapes, before serving:
    the first call of a cold process (allocator, thread pool, CUDA kernels and their
    autotuning) is many times slower than the next, and it would be some user's token. A
    memory-budgeted box warms only what is resident (warming the rest would load it all).
    Returns the seconds it took."""
    start = time.perf_counter()
    if loaded.store is not None:
        units = [loaded.sample_weights()] if loaded.store.resident else []
    else:
        units = [w for layers in loaded.weights.values() for w in layers.values()]
    with torch.inference_mode():
        for tokens in WARM_UP_TOKENS:
            x = torch.zeros(tokens, loaded.hidden_size, device=loaded.device, dtype=loaded.dtype)
            for weights in units:
                expert_forward(x, weights)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    return time.perf_counter() - start


class Agent:
    def __init__(self, config: AgentConfig, ready: Callable[[str], None] = print):
        self.config = config
        self.ready = ready
        self.loaded: LoadedExperts | None = None
        self.store = ShardStore(
            config.store_dir, list(config.experts), accept_fingerprint=config.accept_fingerprint,
            trust_first_push=bool(config.bind) and is_loopback_endpoint(config.bind)) \
            if config.store_dir else None
        self.guard: PeerGuard | None = None  # limits of the bound socket's peers
        self._router_monitor: zmq.Socket | None = None
        # The guard and the router's monitor are shared with a watchdog thread that drains the
        # monitor and checks the kernel's counters while this thread computes (a peer pushed
        # 2.3 GiB during one 3 s computation when only the loop checked): both under this lock.
        # Connections the watchdog saw close wait here for the loop (the store is its own).
        self._router_lock = threading.Lock()
        self._gone_fds: list[int] = []
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        # a flood of bad peers must not become a flood of log lines (one per 10 s at most)
        self._handshake_log, self._refused_log, self._send_log = LogTally(), LogTally(), LogTally()
        self._hint_log = LogTally()
        self.faults = FaultInjector(config.faults)
        self.throughput: dict = {}
        self.warm_up_s: float | None = None  # its experts' first run, before serving
        self.stop_requested = False
        self.ctx: zmq.Context | None = None
        self.router: zmq.Socket | None = None
        self.dealer: zmq.Socket | None = None
        self.authenticator = None  # ZAP for the bound socket (with keys)
        # public key -> what it may do; None without keys (everyone may do everything)
        self._roles_by_key = config.keys.roles_by_key() if config.keys else None
        self.monitors: dict = {}  # monitor socket -> the socket it watches
        self.bound_endpoint: str | None = None
        self.advertised: str | None = None
        self.hello_pending = False
        self._zeros = b""
        # Answering in the request's frame is safe when the bytes crossed a kernel (tcp, ipc);
        # over inproc a zero-copy frame can be the sender's own tensor memory.
        self._answer_in_place = not any((e or "").startswith("inproc://")
                                        for e in (config.bind, config.basestation))

    # -- lifecycle ----------------------------------------------------------------------------

    def check_store(self) -> None:
        """Whether --store may serve as configured (see ShardStore.check_start). Raises
        ShardError."""
        if self.store is not None:
            self.store.check_start()

    def load(self, folder: str) -> None:
        """Raises ShardError (missing, corrupt, wrong shape)."""
        self.loaded = load_experts(folder, list(self.config.experts), self.config.device,
                                   self.config.dtype,
                                   memory_budget_bytes=self.config.memory_budget_bytes,
                                   load_bytes_per_s=self.config.pace_load_bytes_per_s,
                                   prefetch_hints=self.config.prefetch_hints)
        self.warm_up_s = warm_up(self.loaded)
        if self.config.self_benchmark:
            self.throughput = self_benchmark(self.loaded)

    def open_sockets(self) -> None:
        """Raises zmq.ZMQError when the bind address is taken or invalid."""
        self.ctx = zmq.Context()
        keys = self.config.keys
        if self.config.bind:
            self.router = self.ctx.socket(zmq.ROUTER)
            P.configure_socket(self.router, self.config.sockets)
            # No receive HWM here: the PeerGuard bounds each peer's bytes instead. With one,
            # a peer that fills its queue and hangs up aborts the process at the next
            # heartbeat (libzmq 4.3.5 "Assertion failed: !_io_error", stream_engine_base.cpp
            # 310: measured with 3,000 requests, then close).
            self.router.setsockopt(zmq.RCVHWM, 0)
            if keys is not None:
                self.authenticator = start_authenticator(self.ctx, keys.admitted)
                set_curve_server(self.router, keys.keypair)
            self.router.bind(self.config.bind)
            self.bound_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.advertised = self.config.advertise or advertise_address(self.bound_endpoint)
            self._router_monitor = self._watch(self.router)
            self.guard = PeerGuard(self.config.limits or PeerLimits.for_message_cap(
                self.config.sockets.max_message_bytes), curve=keys is not None)
            self._watchdog = threading.Thread(target=self._watch_router, daemon=True,
                                              name="agent-peer-guard")
            self._watchdog.start()
        if self.config.basestation:
            self.dealer = self.ctx.socket(zmq.DEALER)
            self.dealer.setsockopt(zmq.ROUTING_ID, (self.config.agent_id or default_agent_id(
                self.config.experts)).encode()[:255])
            P.configure_socket(self.dealer, self.config.sockets)
            if keys is not None:
                set_curve_client(self.dealer, keys.keypair, self.config.basestation_key)
            self.dealer.connect(self.config.basestation)
            self._watch(self.dealer)
            self.hello_pending = True
        if not self.advertised:
            self.advertised = self.config.advertise

    def _watch(self, sock: zmq.Socket) -> zmq.Socket:
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        self.monitors[monitor] = sock
        return monitor

    def close(self) -> None:
        if self._watchdog is not None:  # before the sockets it reads are closed
            self._watchdog_stop.set()
            self._watchdog.join()
        if self.loaded is not None and self.loaded.store is not None:
            self.loaded.store.close()
        for monitor, sock in self.monitors.items():
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
        for sock in (self.router, self.dealer):
            if sock is not None:
                sock.close(linger=0)
        if self.store:
            self.store.close()
        if self.authenticator is not None:
            self.authenticator.stop()  # its sockets live in ctx: term() would wait for them
        if self.ctx is not None:
            self.ctx.term()

    def where(self) -> str:
        parts = []
        if self.bound_endpoint:
            parts.append(f"serving {self.bound_endpoint} (advertised {self.advertised})")
        if self.config.basestation:
            parts.append(f"dialling {self.config.basestation}")
        return ", ".join(parts)

    def announce_ready(self) -> None:
        loaded = self.loaded
        self.ready(f"edge_agent ready: {self.where()} experts "
                   f"{','.join(map(str, loaded.experts))} layers {loaded.num_layers} "
                   f"device {loaded.device} dtype {str(loaded.dtype).removeprefix('torch.')}")

    # -- serving ------------------------------------------------------------------------------

    def run(self) -> None:
        # Hot path: right after a wake-up every Python and torch call on the way runs several
        # times slower than in a hot loop (README, Performance), so it does as few as it can:
        # one zmq_poll over a fixed list, one message per ready socket per turn (round-robin
        # between sockets), no per-request autograd state.
        served = [s for s in (self.router, self.dealer) if s is not None]
        # monitors first: a connection's close is known before its successor's first message
        # (the router's is the watchdog's, drained before each of the router's messages)
        items = [(m, zmq.POLLIN) for m in self.monitors if m is not self._router_monitor] \
            + [(s, zmq.POLLIN) for s in served]
        timeout_ms = int(min(POLL_INTERVAL_S, CHECK_INTERVAL_S) * 1000)
        next_check_s = 0.0
        with torch.inference_mode():
            while not self.stop_requested:
                if self.hello_pending:
                    self._send_hello()
                for sock, _ in zmq_poll(items, timeout_ms):
                    if sock in self.monitors:
                        self._on_monitor(sock)
                    else:
                        self._serve_one(sock)
                now_s = time.monotonic()
                if now_s >= next_check_s:  # after the reply went out: off the hot path
                    next_check_s = now_s + CHECK_INTERVAL_S
                    if self._router_monitor is not None:
                        self._router_events()
                    if self.store is not None:
                        self.store.expire(now_s)

    def _watch_router(self) -> None:
        """The watchdog thread: the router's connection events and the per-peer limits, every
        CHECK_INTERVAL_S, whatever the loop is doing."""
        while not self._watchdog_stop.wait(CHECK_INTERVAL_S):
            with self._router_lock:
                try:
                    self._on_monitor(self._router_monitor)
                except zmq.ZMQError:  # the context is going away: nothing left to guard
                    return
                self.guard.check()

    def _router_events(self) -> None:
        """Take the router's connection events now (the loop, before a router message)."""
        with self._router_lock:
            if self._router_monitor.get(zmq.EVENTS) & zmq.POLLIN:
                self._on_monitor(self._router_monitor)
            gone, self._gone_fds = self._gone_fds, []
        if self.store is not None:
            for fd in gone:
                self.store.pusher_gone(fd)

    def _serve_one(self, sock: zmq.Socket) -> None:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        fd, sender = None, None
        if sock is self.router:  # [routing id, *body]; every frame names its connection
            fd = _source_fd(frames[0])
            self._router_events()
            with self._router_lock:
                self.guard.received(fd, frames[1:])
            sender = (frames[0], fd)  # a Pusher only if it pushes: not on the hot path
        route = frames[:1] if sock.type == zmq.ROUTER else []
        reply = self.handle(frames[len(route):], self._peer_roles(sock, frames[0]), sender)
        if reply is None:
            return
        if fd is not None:
            with self._router_lock:
                allowed = self.guard.reply_allowed(fd, reply)
            if not allowed:  # this peer does not read what it asked for: dropped (logged)
                return
        try:
            sock.send_multipart(route + reply, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._send_log.add(time.monotonic(), "dropped a reply: the peer is not reading "
                                                 "(send queue full)")
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer left (or was cut) meanwhile
            self._send_log.add(time.monotonic(), f"dropped a reply: {e.strerror}")

    def _peer_roles(self, sock: zmq.Socket, frame: zmq.Frame) -> frozenset[str]:
        if sock is self.dealer:
            return DIALLED_ROLES
        if self._roles_by_key is None:
            return ALL_ROLES
        # on the CURVE server socket ZAP stamped every message with its sender's public key
        return self._roles_by_key.get(peer_public_key(frame), frozenset())

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
            P.check_frames(body, self.config.sockets.max_message_bytes)
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
        kind, request_id = header["kind"], header["id"]
        if kind == P.EXPERT:
            if ROLE_COMPUTE not in roles:
                raise P.ProtocolError(P.ERR_NOT_ALLOWED, "this key may not compute here (it "
                                      "is not in the agent's trusted/ folder)")
            if not self.faults.before_expert():
                log.info("fault injection: dropped expert request %s", request_id)
                return None
            return self.expert(header, payload)
        if kind == P.PREFETCH:
            self.prefetch(header, payload, roles)
            return None
        if kind == P.PING:
            return self.ping(header, payload)
        if kind == P.INFO:
            return [P.pack(P.INFO_REPLY, request_id, info=self.info())]
        if kind in P.PUSH_KINDS:
            if ROLE_PUSH not in roles:
                raise P.ProtocolError(P.ERR_NOT_ALLOWED, "this key may not push shards here "
                                      "(it is not in the agent's pushers/ folder)")
            return self.push(kind, header, payload, sender)
        raise P.ProtocolError(P.ERR_UNKNOWN_KIND, f"unknown message kind {P.shown(kind)}")

    def expert(self, header: dict, payload: list) -> list:
        loaded = self.loaded
        if loaded is None:
            raise P.ProtocolError(P.ERR_NOT_READY, "no shard loaded yet (waiting for a push)")
        layer, experts = header.get("layer"), header.get("experts")
        if not _is_int(layer) or layer not in loaded.moe_layers:
            raise P.ProtocolError(P.ERR_UNKNOWN_LAYER,
                                  f"layer {P.shown(layer)} has no routed experts "
                                  f"(MoE layers: {list(loaded.moe_layers)})")
        if not isinstance(experts, list) or not experts:
            raise P.ProtocolError(P.ERR_MALFORMED, "experts must be [[expert_id, tokens], ...]")
        total_tokens = 0
        for entry in experts:
            if not isinstance(entry, list) or len(entry) != 2:
                raise P.ProtocolError(P.ERR_MALFORMED,
                                      "experts must be [[expert_id, tokens], ...]")
            expert, tokens = entry
            if not _is_int(expert) or expert not in loaded.weights:
                raise P.ProtocolError(P.ERR_UNKNOWN_EXPERT,
                                      f"expert {P.shown(expert)} is not hosted here "
                                      f"(hosted: {loaded.experts})")
            if not _is_int(tokens) or tokens < 0:
                raise P.ProtocolError(P.ERR_SHAPE,
                                      f"token count {P.shown(tokens)} of expert {expert}")
            total_tokens += tokens
        x, is_view = P.decode_tensor_view(header, payload, hidden=loaded.hidden_size)  # [T, D]
        if total_tokens != x.shape[0]:
            raise P.ProtocolError(P.ERR_SHAPE, f"token counts sum to {total_tokens}, shape has "
                                               f"{x.shape[0]} tokens")
        # NaN or inf anywhere makes the sum so (one reduction, not a mask): a peer's NaN was
        # computed and returned. A finite sum past float range is no activation either.
        if not math.isfinite(float(x.sum(dtype=torch.float32))):
            raise P.ProtocolError(P.ERR_NOT_FINITE, "the activations hold NaN or inf; refused")
        wire_dtype = P.wire_dtype_name(header["dtype"])
        reply_dtype = P.wire_dtype_name(header.get("reply_dtype") or wire_dtype)
        # Answer in the request's own frame when the reply has its dtype and shape: no
        # allocation, and the frame goes back as an echo would (no copy, and no round trip
        # through pyzmq's garbage-collector thread, which a zero-copy send of a new buffer costs).
        in_place = is_view and reply_dtype == wire_dtype and self._answer_in_place
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
            y = self._compute_budgeted(store, header, layer, experts, compute_x, out)
        elif len(experts) == 1:
            y = expert_forward(compute_x, loaded.weights[experts[0][0]][layer], out=out)
        else:
            parts, offset = [], 0
            for expert, tokens in experts:
                rows = slice(offset, offset + tokens)
                parts.append(expert_forward(compute_x[rows], loaded.weights[expert][layer],
                                            out=None if out is None else out[rows]))
                offset += tokens
            y = out if out is not None else torch.cat(parts)
        if in_place and y is not x:
            x.copy_(y)  # another device or dtype: one conversion, into the frame
        elif loaded.device.type == "cuda":
            y = y.cpu()  # includes the wait for the kernels
        compute_s = time.perf_counter() - start
        paced_s = sum(max(self.config.pace_s_per_call, tokens * self.config.pace_s_per_token)
                      for _, tokens in experts) if self.config.pace_s_per_call or \
            self.config.pace_s_per_token else 0.0
        if compute_s < paced_s:
            time.sleep(paced_s - compute_s)
            compute_s = time.perf_counter() - start
        if in_place:
            frames, fields = [payload[0]], {"dtype": wire_dtype, "shape": header["shape"]}
        else:
            frames, fields = P.encode_tensor(y, reply_dtype)
        if store is not None:
            fields["cache"] = store.reply_fields()
        return [P.pack(P.EXPERT_REPLY, header["id"], layer=layer, experts=experts,
                       compute_s=compute_s, **fields)] + frames

    def _compute_budgeted(self, store, header: dict, layer: int, experts: list,
                          x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """A budgeted box computes one expert at a time, each loaded just before (within the
        budget and one unit: shards.ExpertStore.acquire_each)."""
        carried = header.get("prefetch")
        parts, offset = [], 0
        units = store.acquire_each(layer, [expert for expert, _ in experts])
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

    def prefetch(self, header: dict, payload: list, roles: frozenset[str]) -> None:
        """A hint (protocol.PREFETCH): load these layer-experts in the background. Never
        answered, never raises: a hint from a key that may not compute, to a box without a
        budget, or garbled, is dropped (and logged, at most once per 10 s)."""
        store = self.loaded.store if self.loaded is not None else None
        try:
            hint = P.parse_prefetch(header, payload)
            if ROLE_COMPUTE not in roles:
                raise P.ProtocolError(P.ERR_NOT_ALLOWED, "a key that may not compute")
            if store is not None:
                store.hint(hint.layer, hint.experts, hint.percent)
        except P.ProtocolError as e:
            self._hint_log.add(time.monotonic(), f"dropped a prefetch hint: {e.message}")
        except Exception:  # a bug must not take the box down, nor answer a hint
            log.exception("prefetch hint failed")

    def ping(self, header: dict, payload: list) -> list:
        reply_bytes = header.get("reply_bytes")
        if reply_bytes is None:
            return [P.pack(P.PONG, header["id"], bytes=sum(len(f.buffer) for f in payload))] \
                + list(payload)
        if not isinstance(reply_bytes, int) or not 0 <= reply_bytes <= \
                self.config.sockets.max_message_bytes:
            raise P.ProtocolError(P.ERR_TOO_LARGE, f"reply_bytes {P.shown(reply_bytes)} is out "
                                                      "of range")
        if len(self._zeros) < reply_bytes:
            self._zeros = bytes(reply_bytes)
        data = memoryview(self._zeros)[:reply_bytes]
        return [P.pack(P.PONG, header["id"], bytes=reply_bytes), data]

    def info(self) -> dict:
        loaded = self.loaded
        info = {
            "protocol": P.PROTOCOL_VERSION,
            "agent_id": self.config.agent_id or default_agent_id(self.config.experts),
            "experts": list(self.config.experts),
            "serving": loaded is not None,
            "advertise": self.advertised,
            "capabilities": {"wire_dtypes": list(P.WIRE_DTYPES), "push": self.store is not None,
                             "max_message_bytes": self.config.sockets.max_message_bytes},
            "pid": os.getpid(),
        }
        if loaded is None:
            folder = self.config.store_dir or self.config.shards_dir
            info["missing"] = missing_experts(folder, list(self.config.experts)) if folder else []
            return info
        info.update(
            layers=loaded.num_layers, hidden=loaded.hidden_size, ffn=loaded.ffn_size,
            dtype=str(loaded.dtype).removeprefix("torch."),
            fingerprint=loaded.manifest.fingerprint, model=loaded.manifest.model,
            shard_bytes=loaded.shard_bytes, throughput=self.throughput,
            warm_up_s=self.warm_up_s, **device_facts(loaded.device))
        if loaded.store is not None:  # the base station sends prefetch hints to these only
            info["memory_budget"] = loaded.store.figures()
        return info

    def push(self, kind: str, header: dict, payload: list, sender: tuple | None = None
             ) -> list:
        if self.store is None:
            raise P.ProtocolError(P.ERR_PUSH, "this agent was not started with --store DIR")
        pusher = Pusher(sender[0].bytes, sender[1]) if sender else Pusher(b"")
        now_s = time.monotonic()
        if kind == P.PUSH_BEGIN:
            if self._router_monitor is not None:
                self._router_events()  # a pusher that just left frees the store
            ack = self.store.begin(header, payload, pusher, now_s)
        elif kind == P.PUSH_CHUNK:
            ack = self.store.chunk(header, payload, pusher, now_s)
        else:
            ack = self.store.end(header, pusher, now_s)
            if self.loaded is None and not missing_experts(self.store.folder,
                                                           list(self.config.experts)):
                try:
                    self.load(self.store.folder)
                except ShardError as e:
                    raise P.ProtocolError(P.ERR_PUSH, f"received, but loading failed: {e}") \
                        from None
                self.announce_ready()
                self.hello_pending = self.dealer is not None  # re-announce with the model
            ack["serving"] = self.loaded is not None
        return [P.pack(P.PUSH_ACK, header["id"], expert=header.get("expert"), **ack)]

    # -- dial-in and connection events ------------------------------------------------------

    def _send_hello(self) -> None:
        try:
            self.dealer.send(P.pack(P.HELLO, 0, info=self.info()), flags=zmq.NOBLOCK)
            self.hello_pending = False
            log.info("announced to %s", self.config.basestation)
        except zmq.Again:  # not connected yet (IMMEDIATE): the next connect event retries
            pass

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, endpoint = event["event"], event.get("endpoint", b"").decode(errors="replace")
            watched, fd = self.monitors[monitor], int(event.get("value") or 0)  # fd, or 0
            if kind == zmq.EVENT_ACCEPTED and watched is self.router:
                self.guard.accepted(fd)  # may cut the connection idle longest (the cap)
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and watched is self.router:
                self._gone_fds.append(fd)  # the store learns it in the loop (_router_events)
                if self.guard.closed(fd) and kind == zmq.EVENT_DISCONNECTED:  # not cut by us
                    log.info("peer disconnected on %s (closed, heartbeat timeout, or a frame "
                             "over the %d-byte cap)", endpoint,
                             self.config.sockets.max_message_bytes)
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._handshake_log.add(time.monotonic(), (
                    f"dropped a connection on {endpoint}: ZMTP handshake failed (not a ZeroMQ "
                    "peer, garbage on the port, or "
                    f"{'a peer without keys' if self.config.keys else 'a peer with keys'})"))
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if watched is self.dealer:
                    log.warning("the base station at %s refused this agent's key (%s must "
                                "be in its trusted/ folder)", endpoint,
                                self.config.keys.keypair.path.removesuffix("_secret"))
                else:
                    self._refused_log.add(time.monotonic(), (
                        f"refused a peer on {endpoint}: its key is not in "
                        f"{self.config.keys.folder}/trusted/ or pushers/"))
            elif kind == zmq.EVENT_DISCONNECTED:
                log.info("disconnected from %s (closed, heartbeat timeout, or a frame over the "
                         "%d-byte cap)", endpoint, self.config.sockets.max_message_bytes)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and watched is self.dealer:
                self.hello_pending = True  # (re)connected to the base station: announce again


def _source_fd(frame: zmq.Frame) -> int | None:
    """The connection a received message came from (libzmq's ZMQ_SRCFD)."""
    try:
        return frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not layer 1
