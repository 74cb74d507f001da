"""Expert popularity: how many router slots went to each (layer, expert), and its JSON file.

The MoE layer calls `Popularity.add` once per layer call with the router's [T, K] expert ids
(MoeRuntime.popularity; `serve`, `generate` and `chat` attach one with `--popularity-out FILE`:
generate and chat write it when they end, serve every SAVE_INTERVAL_S and when it stops).
`basestation plan` reads the file as each expert's load: an agent holds an expert id for every
layer, so the planner's load of expert e is its slots summed over the layers (`totals`).

The file (small, written atomically):
    {"version": 1, "num_experts": E, "tokens": N,
     "layers": {"0": [E slot counts], "1": [...], ...}, "slots": S}
`layers` keys are the MoE layer indices as the runtime numbers them; `tokens` is the most token
rows any one layer saw (the tokens that went through the model); `slots` is the sum of every
count (tokens x top-k when nothing was left out), written so a reader can check the file.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import torch

from common.staging import write_file_atomic

POPULARITY_VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # a file larger than this is not one of ours (layers x E counts)


class PopularityError(ValueError):
    """A popularity file that cannot be read as one: its message is one line for the user."""


class Popularity:
    """Slot counts per (layer, expert); `add` runs on the engine's thread, `snapshot` and `save`
    on any (serve's periodic writer), so both take the lock (uncontended: ~0.1 µs a layer)."""

    def __init__(self, num_experts: int):
        if num_experts < 1:
            raise ValueError("num_experts must be >= 1")
        self.num_experts = num_experts
        self._counts: dict[int, list[int]] = {}  # layer -> [E] slots
        self._tokens: dict[int, int] = {}  # layer -> token rows seen
        self._lock = threading.Lock()

    def add(self, layer: int, experts: torch.Tensor, rows: list[list[int]] | None) -> None:
        """Count one layer call: experts [T, K] the router's ids; rows: experts.tolist() when the
        caller has it (decode: a Python loop beats any tensor op at a few slots)."""
        if rows is None:  # a batch: one bincount, one list conversion
            added = torch.bincount(experts.reshape(-1), minlength=self.num_experts).tolist()
            tokens = int(experts.shape[0])
        else:
            added, tokens = None, len(rows)
        with self._lock:
            counts = self._counts.get(layer)
            if counts is None:
                counts = self._counts[layer] = [0] * self.num_experts
            if added is None:
                for row in rows:
                    for expert in row:
                        counts[expert] += 1
            else:
                for expert, n in enumerate(added):
                    counts[expert] += n
            self._tokens[layer] = self._tokens.get(layer, 0) + tokens

    def snapshot(self) -> dict[int, list[int]]:
        """layer -> [E] slot counts, a copy."""
        with self._lock:
            return {layer: list(counts) for layer, counts in sorted(self._counts.items())}

    @property
    def tokens(self) -> int:
        """Token rows through the model: the most any one layer saw."""
        with self._lock:
            return max(self._tokens.values(), default=0)

    @property
    def slots(self) -> int:
        return sum(sum(counts) for counts in self.snapshot().values())

    def totals(self) -> list[int]:
        """[E] slots per expert over every layer: the planner's load."""
        return totals(self.snapshot(), self.num_experts)

    def to_json(self) -> dict:
        layers = self.snapshot()
        return {"version": POPULARITY_VERSION, "num_experts": self.num_experts,
                "tokens": self.tokens,
                "layers": {str(layer): counts for layer, counts in layers.items()},
                "slots": sum(sum(c) for c in layers.values())}

    def save(self, path: str) -> None:
        """Write the file atomically (a reader never sees half of it). Raises OSError."""
        write_file_atomic(path, (json.dumps(self.to_json(), separators=(",", ":")) + "\n")
                          .encode())


def totals(layers: dict[int, list[int]], num_experts: int) -> list[int]:
    """[E] sums over the layers' counts."""
    out = [0] * num_experts
    for counts in layers.values():
        for expert, n in enumerate(counts):
            out[expert] += n
    return out


def load_popularity(path: str) -> Popularity:
    """Read a file `save` wrote. Raises PopularityError (one line) for a file that is missing,
    not JSON, of another version, or with counts of the wrong shape or sign."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PopularityError(f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PopularityError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB: not a "
                              "popularity file")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PopularityError(f"{path}: not JSON (expected a popularity file from "
                              "--popularity-out)") from None
    return popularity_from_json(data, path)


def popularity_from_json(data, where: str = "popularity") -> Popularity:
    """The checks of load_popularity on parsed JSON. Raises PopularityError."""
    if not isinstance(data, dict) or data.get("version") != POPULARITY_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise PopularityError(f"{where}: not a version {POPULARITY_VERSION} popularity file "
                              f"(version {str(version)[:20]})")
    num_experts, layers = data.get("num_experts"), data.get("layers")
    if not _count(num_experts) or num_experts < 1:
        raise PopularityError(f"{where}: num_experts must be an integer >= 1")
    if not isinstance(layers, dict):
        raise PopularityError(f"{where}: layers must be an object of layer -> counts")
    popularity = Popularity(num_experts)
    for key, counts in layers.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise PopularityError(f"{where}: layer {key[:20]!r} is not a layer index")
        if not isinstance(counts, list) or len(counts) != num_experts:
            raise PopularityError(f"{where}: layer {key} needs {num_experts} counts")
        if not all(_count(n) for n in counts):
            raise PopularityError(f"{where}: layer {key}: counts must be integers >= 0")
        popularity._counts[int(key)] = list(counts)
    tokens, slots = data.get("tokens", 0), data.get("slots")
    if not _count(tokens):
        raise PopularityError(f"{where}: tokens must be an integer >= 0")
    popularity._tokens = {layer: tokens for layer in popularity._counts}
    if slots is not None and slots != popularity.slots:
        raise PopularityError(f"{where}: slots {str(slots)[:20]} is not the sum of the counts "
                              f"({popularity.slots}): the file was changed or cut")
    return popularity


def _count(value) -> bool:
    """An integer >= 0 (a JSON bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


SAVE_INTERVAL_S = 60.0  # serve's writer: a killed server leaves a file at most this old


def out_path_error(path: str) -> str | None:
    """Why --popularity-out PATH cannot be written at the end, in one line, or None: checked
    before a run starts, so a long run's counts are not lost to a typo."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--popularity-out {path}: no such folder {folder}"
    if os.path.isdir(path):
        return f"--popularity-out {path}: is a folder"
    return None


class PopularityWriter:
    """Saves `popularity` to `path` every `interval_s` on a daemon thread and once at close()
    (serve: counts survive a kill, minus the last interval). A failed periodic write is one
    line on stderr and tried again next time; close() raises the final write's OSError."""

    def __init__(self, popularity: Popularity, path: str, interval_s: float = SAVE_INTERVAL_S):
        self.popularity, self.path, self.interval_s = popularity, path, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popularity-writer", daemon=True)

    def start(self) -> PopularityWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.popularity.save(self.path)
            except OSError as e:
                print(f"basestation: cannot write {self.path}: {e.strerror or e}",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)  # a save takes milliseconds; never hang shutdown
        self.popularity.save(self.path)
