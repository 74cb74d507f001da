"""Expert-id lists as users type them (`3`, `0,3`, `0-3`, `0-1,6`): the one parser every tool uses."""

from __future__ import annotations

# Far above any MoE's routed experts per layer (DeepSeek-V3: 256); checked before a range is
# expanded (`0-50000000` would take 51 s, then MemoryError, in the base station's roster).
MAX_EXPERT_ID = 4095


def parse_expert_ids(spec: str) -> tuple[int, ...]:
    """'3' | '0,3' | '0-3' | '0-1,6' -> sorted unique ids, each at most MAX_EXPERT_ID. Raises
    ValueError with a message."""
    ids: set[int] = set()
    shown = spec if len(spec) <= 40 else spec[:40] + "..."
    try:
        for part in spec.split(","):
            low, sep, high = part.strip().partition("-")
            first, last = int(low), int(high) if sep else int(low)
            if first < 0 or last < first:
                raise ValueError
            if last > MAX_EXPERT_ID:
                raise OverflowError
            ids.update(range(first, last + 1))
    except OverflowError:
        raise ValueError(f"{shown!r}: expert ids go up to {MAX_EXPERT_ID}") from None
    except ValueError:
        raise ValueError(f"{shown!r}: expected expert ids like 3, 0,3 or 0-3") from None
    return tuple(sorted(ids))


def format_expert_ids(ids) -> str:
    return ",".join(str(i) for i in ids)
