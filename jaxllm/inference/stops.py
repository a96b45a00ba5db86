"""Stop strings: matched on decoded text, because the same text has many tokenisations (a stop "\\n\\n" may
come as one piece or two), so matching stop-token sequences would miss some."""
from __future__ import annotations

from typing import Callable, Sequence


def check_stop_strings(stop_strings: Sequence[str]) -> tuple[str, ...]:
    stops = tuple(stop_strings)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty text, got {list(stops)!r}")
    return stops


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string: a stream must not
    show it yet (the next token may complete the stop)."""
    return max((n for s in stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


def stop_length(ids: Sequence[int], decode: Callable[[list[int]], str], stop_strings: Sequence[str]) -> int | None:
    """Fewest leading `ids` whose decoded text contains a stop string (None if the whole does not).
    Binary search: decoded text only grows as tokens are added."""
    ids = list(ids)
    if not ids or find_stop(decode(ids), stop_strings) is None:
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(decode(ids[:mid]), stop_strings) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo
