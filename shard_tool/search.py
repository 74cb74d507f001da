"""`--bits auto`: EdgeMoE's expert-wise bitwidth search (arXiv 2308.14352, expert-wise bitwidth
adaptation), measured on calibration text with the local model.

1. Sensitivity: each routed expert of each MoE layer (a "unit", (layer, expert)) alone at the low
   width (4 bits), everything else at 16: the calibration loss increase it causes.
2. Every unit at the base width (8 bits); if that alone breaks the tolerance the search stops.
3. The least sensitive unit goes down to 4 bits, then the next, one step at a time, each step
   measured; the first step whose loss increase passes the tolerance is undone and the search
   ends there.

Loss = mean next-token negative log-likelihood over the calibration windows; "increase" is
relative to the 16-bit model's, in percent. The model is the checkpoint loaded by transformers in
float32, its experts' weights replaced in place by dequantize(quantize(W)) (shard_tool/quant.py:
the values the agents will hold). The pure decision (`choose_widths`) takes the measurement as a
function, so it is tested with hand-made numbers.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.errors import ShardError
from shard_tool.families import ModelShape
from shard_tool.manifest import FULL_BITS, stored_transposed

BASE_BITS = 8  # every unit starts here
LOW_BITS = 4  # the least sensitive units go down to here
WINDOW_TOKENS = 512  # calibration window (capped by the model's max_position_embeddings)
LOGITS_BYTES = 256 * 1024 * 1024  # bound on one forward pass's float32 logits
# Default calibration text: docstrings of these standard-library modules (on every machine with
# Python; English prose about code). --calibration FILE replaces it.
DEFAULT_CALIBRATION_MODULES = (
    "argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "enum",
    "functools", "json", "logging", "pathlib", "shutil", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile")

Unit = tuple[int, int]  # (MoE layer, expert id)


@dataclass(frozen=True)
class Choice:
    """What `choose_widths` decided, and what it measured on the way."""

    bits: dict[Unit, int]  # every unit -> BASE_BITS or LOW_BITS
    increase_pct: float  # measured loss increase of `bits` over 16 bits
    base_increase_pct: float  # every unit at BASE_BITS
    feasible: bool  # False: even BASE_BITS everywhere passes the tolerance
    steps: int  # units tried at LOW_BITS


@dataclass(frozen=True)
class SearchResult:
    widths: dict[int, dict[int, int]]  # expert id -> {MoE layer: bits}
    sensitivity_pct: dict[Unit, float]  # loss increase with only that unit at LOW_BITS
    loss_16: float  # mean NLL of the unquantised model
    increase_pct: float  # the chosen widths' measured loss increase
    base_increase_pct: float  # every unit at BASE_BITS
    tolerance_pct: float
    tokens: int  # calibration tokens scored
    evaluations: int  # forward passes over the calibration text
    calibration: str = field(default="")  # where the text came from

    @property
    def perplexity_increase_pct(self) -> float:
        return 100 * math.expm1(self.loss_16 * self.increase_pct / 100)


def increase_pct(loss: float, loss_16: float) -> float:
    return 100 * (loss - loss_16) / loss_16


def choose_widths(units: list[Unit], sensitivity_pct: dict[Unit, float],
                  measure_pct: Callable[[dict[Unit, int]], float], tolerance_pct: float,
                  on_step: Callable[[], None] = lambda: None) -> Choice:
    """Steps 2-3 of the module docstring. `measure_pct(bits)` -> loss increase in percent of the
    model with those widths. Pure apart from what `measure_pct` does."""
    bits = {u: BASE_BITS for u in units}
    base = measure_pct(dict(bits))
    on_step()
    if base > tolerance_pct:
        return Choice(bits, base, base, feasible=False, steps=0)
    current, steps = base, 0
    for unit in sorted(units, key=lambda u: (sensitivity_pct[u], u)):
        trial = {**bits, unit: LOW_BITS}
        measured = measure_pct(trial)
        steps += 1
        on_step()
        if measured > tolerance_pct:
            break
        bits, current = trial, measured
    return Choice(bits, current, base, feasible=True, steps=steps)


# -- the measurement ---------------------------------------------------------------------------

def default_calibration_text() -> str:
    """Docstrings of DEFAULT_CALIBRATION_MODULES and their public members, in a fixed order."""
    import importlib
    import inspect
    import warnings

    texts = []
    with warnings.catch_warnings():  # reading some modules' docs warns (typing.io, ...)
        warnings.simplefilter("ignore")
        for name in DEFAULT_CALIBRATION_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            members = [module] + [vars(module)[m] for m in sorted(vars(module))
                                  if not m.startswith("_")
                                  and getattr(vars(module)[m], "__module__", None) == name]
            texts += [doc for doc in map(inspect.getdoc, members) if doc]
    return "\n\n".join(texts)


def calibration_windows(tokenizer, text: str, max_tokens: int, window: int):
    """Token ids [B, W] of the text's first max_tokens tokens, each window led by BOS when the
    tokenizer has one (the tail that fills no whole window is left out unless it is all)."""
    import torch

    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])[:max_tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = window - len(bos)
    pieces = [ids[i:i + body] for i in range(0, len(ids), body)]
    if len(pieces) > 1 and len(pieces[-1]) < body:
        pieces.pop()
    if not pieces or len(bos) + len(pieces[0]) < 2:
        raise ShardError("--bits auto: the calibration text is too short (under 2 tokens)")
    return torch.tensor([bos + p for p in pieces])


class CalibrationLoss:
    """Mean next-token NLL of `model` over fixed windows [B, W]."""

    def __init__(self, model, windows):
        self.model, self.windows = model, windows
        vocab = int(model.config.get_text_config().vocab_size)
        self.batch = max(1, LOGITS_BYTES // (windows.shape[1] * vocab * 4))
        self.tokens = windows.shape[0] * (windows.shape[1] - 1)

    def __call__(self) -> float:
        import torch
        import torch.nn.functional as F

        nll = 0.0
        with torch.inference_mode():
            for start in range(0, self.windows.shape[0], self.batch):
                ids = self.windows[start:start + self.batch]  # [b, W]
                logits = self.model(input_ids=ids).logits[:, :-1].float()  # [b, W-1, V]
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1), reduction="sum").item()
        return nll / self.tokens


class ExpertSlots:
    """The routed experts' weight matrices of a transformers model, set to 16/8/4 bits one unit
    at a time. Every family keeps them in an `…Experts` module as gate_up_proj [E, 2F, H] and
    down_proj [E, H, F] (GPT-OSS: [E, H, 2F] and [E, F, H], quantised transposed, as the split
    stores them). Holds the quantised forms of every unit (about 1.7 bytes a weight), so the
    model's float originals can be overwritten."""

    def __init__(self, model, shape: ModelShape):
        self.transposed = stored_transposed(shape.expert_kind)
        self.params: dict[int, tuple] = {}
        for name, module in model.named_modules():
            gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj",
                                                                         None)
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if (match and getattr(gate_up, "dim", lambda: 0)() == 3
                    and getattr(down, "dim", lambda: 0)() == 3
                    and gate_up.shape[0] == shape.num_experts):
                self.params[int(match.group(1))] = (gate_up, down)
        if sorted(self.params) != list(shape.moe_layers):
            raise ShardError(f"--bits auto: found routed experts in layers {sorted(self.params)} "
                             f"of the loaded model, the config says {list(shape.moe_layers)}")
        self.units = [(layer, q) for layer in shape.moe_layers for q in range(shape.num_experts)]
        self.quantised: dict[tuple[Unit, int], tuple] = {}
        self.bits = {u: FULL_BITS for u in self.units}

    def _matrices(self, unit: Unit):
        layer, q = unit
        return [p.data[q] for p in self.params[layer]]

    def prepare(self, widths: Iterable[int]) -> None:
        """Quantise every unit at each width once, from the original floats."""
        from shard_tool import quant

        for unit in self.units:
            for bits in widths:
                self.quantised[unit, bits] = tuple(
                    quant.quantize(m.t() if self.transposed else m, bits)
                    for m in self._matrices(unit))

    def set(self, unit: Unit, bits: int) -> None:
        """Write the unit's matrices at `bits` (16 only while the originals are untouched)."""
        from shard_tool import quant

        if bits == self.bits[unit]:
            return
        if bits == FULL_BITS:
            raise ValueError("ExpertSlots.set: the originals are gone; use `alone` for 16 bits")
        for matrix, q in zip(self._matrices(unit), self.quantised[unit, bits]):
            values = quant.dequantize(q)
            matrix.copy_(values.t() if self.transposed else values)
        self.bits[unit] = bits

    @contextmanager
    def alone(self, unit: Unit, bits: int):
        """Only `unit` at `bits` inside the block; its floats are restored after it."""
        saved = [m.clone() for m in self._matrices(unit)]
        self.set(unit, bits)
        try:
            yield
        finally:
            for matrix, original in zip(self._matrices(unit), saved):
                matrix.copy_(original)
            self.bits[unit] = FULL_BITS

    def apply(self, bits: dict[Unit, int]) -> None:
        for unit, b in bits.items():
            self.set(unit, b)


def _load(src: str):
    """transformers' model (float32, eval) and tokenizer of the checkpoint. Raises ShardError."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, experts_implementation="eager").eval()  # fastest on a CPU
    except Exception as e:  # noqa: BLE001 (whatever transformers raises: one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardError(f"--bits auto: cannot load the model and tokenizer of {src} with "
                         f"transformers: {first}") from None
    return model, tokenizer


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="bits auto", unit="pass", file=sys.stderr,
                dynamic_ncols=True, disable=not enabled)


def search_bits(src: str, shape: ModelShape, tolerance_pct: float, calibration: str | None,
                max_tokens: int, progress: bool = False) -> SearchResult:
    """Run the search on checkpoint SRC. Raises ShardError (unloadable model, unreadable or too
    short text, tolerance not reachable even at BASE_BITS); KeyboardInterrupt stops it."""
    if calibration is None:
        text, where = default_calibration_text(), "Python standard-library docstrings"
    else:
        try:
            with open(calibration, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ShardError(f"--calibration {calibration}: unreadable: {e}") from None
        where = calibration
    model, tokenizer = _load(src)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    window = min(WINDOW_TOKENS, int(limit or WINDOW_TOKENS))
    loss = CalibrationLoss(model, calibration_windows(tokenizer, text, max_tokens, window))
    slots = ExpertSlots(model, shape)
    slots.prepare((BASE_BITS, LOW_BITS))
    units = slots.units
    evaluations = 0

    def measure() -> float:
        nonlocal evaluations
        evaluations += 1
        return loss()

    with _progress(1 + 2 * len(units) + 1, progress) as bar:
        loss_16 = measure()
        bar.update()
        sensitivity = {}
        for unit in units:
            with slots.alone(unit, LOW_BITS):
                sensitivity[unit] = increase_pct(measure(), loss_16)
            bar.update()

        def measure_pct(bits: dict[Unit, int]) -> float:
            slots.apply(bits)
            return increase_pct(measure(), loss_16)

        choice = choose_widths(units, sensitivity, measure_pct, tolerance_pct, bar.update)
    if not choice.feasible:
        raise ShardError(f"--bits auto: every expert at {BASE_BITS} bits already raises the "
                         f"calibration loss by {choice.base_increase_pct:.3f} % (tolerance "
                         f"{tolerance_pct:g} %); use --bits 16 or a larger --tolerance")
    widths: dict[int, dict[int, int]] = {q: {} for q in range(shape.num_experts)}
    for (layer, q), b in choice.bits.items():
        widths[q][layer] = b
    return SearchResult(widths=widths, sensitivity_pct=sensitivity, loss_16=loss_16,
                        increase_pct=choice.increase_pct,
                        base_increase_pct=choice.base_increase_pct, tolerance_pct=tolerance_pct,
                        tokens=loss.tokens, evaluations=evaluations, calibration=where)


def describe(result: SearchResult) -> str:
    """The lines `split --bits auto` prints after the table."""
    low = sum(1 for layers in result.widths.values() for b in layers.values() if b == LOW_BITS)
    total = sum(len(layers) for layers in result.widths.values())
    most = max(result.sensitivity_pct, key=result.sensitivity_pct.get)
    return (f"bits auto: {low} of {total} expert layers at {LOW_BITS} bits, the rest at "
            f"{BASE_BITS}; measured loss increase {result.increase_pct:+.3f} % (perplexity "
            f"{result.perplexity_increase_pct:+.3f} %) against tolerance "
            f"{result.tolerance_pct:g} %; all at {BASE_BITS} bits {result.base_increase_pct:+.3f} "
            f"%\nbits auto: {result.tokens} calibration tokens ({result.calibration}), "
            f"16-bit loss {result.loss_16:.4f}, {result.evaluations} passes; most sensitive: "
            f"layer {most[0]} expert {most[1]} ({result.sensitivity_pct[most]:+.3f} % alone at "
            f"{LOW_BITS} bits)")
