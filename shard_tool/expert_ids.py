"""Expert-id lists as users type them (`3`, `0,3`, `0-3`, `0-1,6`): the one parser every tool uses."""

from __future__ import annotations


def parse_expert_ids(spec: str) -> tuple[int, ...]:
    """'3' | '0,3' | '0-3' | '0-1,6' -> sorted unique ids. Raises ValueError with a message."""
    ids: set[int] = set()
    try:
        for part in spec.split(","):
            low, sep, high = part.strip().partition("-")
            first, last = int(low), int(high) if sep else int(low)
            if first < 0 or last < first:
                raise ValueError
            ids.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"{spec!r}: expected expert ids like 3, 0,3 or 0-3") from None
    return tuple(sorted(ids))


def format_expert_ids(ids) -> str:
    return ",".join(str(i) for i in ids)
