"""Facts about this box and what it serves: the info an agent answers INFO with and announces
in its HELLO, and the address others reach it on."""

from __future__ import annotations

import logging
import os
import platform

import torch

from edge_agent.config import AgentConfig
from edge_agent.shard_reader import missing_experts
from edge_agent.shards import LoadedExperts
from wire import protocol as P

log = logging.getLogger("edge_agent")


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
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"device": "cpu", "device_name": name, "memory_bytes": memory,
            "threads": torch.get_num_threads()}


def agent_info(config: AgentConfig, loaded: LoadedExperts | None, advertised: str | None,
               takes_pushes: bool, throughput: dict, warm_up_s: float | None) -> dict:
    """What the agent reports of itself (INFO_REPLY, HELLO): before its shards are loaded, the
    experts it still misses; after, its model, its box and its measured speed."""
    info = {
        "protocol": P.PROTOCOL_VERSION,
        "agent_id": config.agent_id,
        "experts": list(config.experts),
        "serving": loaded is not None,
        "advertise": advertised,
        "capabilities": {"wire_dtypes": list(P.WIRE_DTYPES), "push": takes_pushes,
                         "max_message_bytes": config.network.sockets.max_message_bytes},
        "pid": os.getpid(),
    }
    if loaded is None:
        folder = config.store_dir or config.shards_dir
        info["missing"] = missing_experts(folder, list(config.experts)) if folder else []
        return info
    info.update(
        layers=loaded.num_layers, hidden=loaded.hidden_size, ffn=loaded.ffn_size,
        dtype=str(loaded.dtype).removeprefix("torch."),
        fingerprint=loaded.manifest.fingerprint, model=loaded.manifest.model,
        shard_bytes=loaded.shard_bytes, throughput=throughput,
        warm_up_s=warm_up_s, **device_facts(loaded.device))
    if loaded.store is not None:  # the base station sends prefetch hints to these only
        info["memory_budget"] = loaded.store.figures()
    return info
