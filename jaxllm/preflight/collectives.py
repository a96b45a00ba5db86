"""The collectives a compiled program runs, read from its optimized HLO text (`compiled.as_text()`).

A collective inside a `while` body runs once per iteration: the scan over layers makes one written
all-gather run `num_layers` times, and the micro-batch scan multiplies again. Counts and bytes here are
per execution of the program, with every loop's trip count applied (read from the loop's condition,
`i < N`). Bytes are per device: the larger of what a device sends in (its operands) and receives (its
result), e.g. the gathered array of an all-gather, the full input of a reduce-scatter.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODES = {**{k: k for k in KINDS}, **{f"{k}-start": k for k in KINDS}, "ragged-all-to-all": "all-to-all"}
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
          "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|true_computation|"
                      r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class Collective:
    kind: str
    count: int = 0
    bytes: float = 0.0


@dataclasses.dataclass
class CollectiveStats:
    by_kind: dict                    # kind -> Collective (counts and bytes per execution)
    unknown_trip_counts: int = 0     # loops whose trip count could not be read (counted once)

    @property
    def total_bytes(self) -> float:
        return sum(c.bytes for c in self.by_kind.values())


def _array_bytes(text: str) -> list[float]:
    """Bytes of every array type in a shape string (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        size = _BYTES.get(dtype)
        if size is None and dtype.startswith("f8"):
            size = 1
        if size is not None:
            out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _split_type(rest: str) -> tuple[str, str]:
    """('shape', 'opcode(...), attrs') from the text after `name = `; tuple shapes nest parentheses."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _operands(call: str) -> list[str]:
    """Names of the operands in `opcode(%a, %b), ...`."""
    start = call.find("(")
    depth, end = 0, len(call)
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", call[start:end])


def _parse(text: str):
    """{computation: [(name, shape, opcode, call text)]}, the entry computation's name, {name: shape}."""
    computations, shapes, entry, current = {}, {}, None, None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("HloModule", "//")):
            continue
        if line == "}":
            current = None
            continue
        if current is None:
            header = _HEADER.match(line)
            if header and line.rstrip().endswith("{"):
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        shape, call = _split_type(rest)
        opcode = call.split("(", 1)[0].strip()
        shapes[name] = shape
        computations[current].append((name, shape, opcode, call))
    return computations, entry, shapes


def _trip_count(call: str, computations) -> int | None:
    """A while loop's iterations: XLA's known_trip_count, else N of a condition `counter < N`."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', call)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", call)
    body = computations.get(condition.group(1), []) if condition else []
    constants = {}
    for name, _, opcode, text in body:
        value = re.match(r"constant\((-?\d+)\)", text)
        if opcode == "constant" and value:
            constants[name] = int(value.group(1))
    for _, _, opcode, text in body:
        if opcode == "compare" and "direction=LT" in text:
            bounds = [constants[o] for o in _operands(text) if o in constants]
            if len(bounds) == 1:
                return bounds[0]
    return None


def _callers_first(entry, calls, computations) -> list[str]:
    """The computations reachable from `entry`, each after every computation that calls it."""
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _ in calls[stack.pop()]:
            if callee in computations and callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    callers = collections.Counter(callee for comp in reachable for callee, _ in calls[comp] if callee in reachable)
    order, ready = [], [entry]
    while ready:
        comp = ready.pop()
        order.append(comp)
        for callee, _ in calls[comp]:
            if callee in reachable:
                callers[callee] -= 1
                if callers[callee] == 0:
                    ready.append(callee)
    return order


def collectives(hlo_text: str, unknown_trips: int | None = None) -> CollectiveStats:
    """Count and size every collective of an optimized HLO module, loops unrolled by their trip counts;
    a loop whose bound is not a constant runs `unknown_trips` times (default: counted once, and reported)."""
    computations, entry, shapes = _parse(hlo_text)
    calls = collections.defaultdict(list)  # computation -> [(callee, times per call)]
    unknown = 0
    for comp, instructions in computations.items():
        for _, _, opcode, text in instructions:
            if opcode in ("async-update", "async-done"):
                continue  # the same wrapped computation as its async-start
            trips = 1
            if opcode == "while":
                trips = _trip_count(text, computations)
                if trips is None and unknown_trips is None:
                    unknown, trips = unknown + 1, 1
                trips = unknown_trips if trips is None else trips
            for attribute, value in _CALLEES.findall(text):
                for callee in re.findall(r"%?([\w.\-]+)", value):
                    calls[comp].append((callee, trips if attribute == "body" else 1))
    order = _callers_first(entry, calls, computations)
    times = collections.Counter({entry: 1})
    for comp in order:
        for callee, trips in calls[comp]:
            times[callee] += times[comp] * trips
    stats = {kind: Collective(kind) for kind in KINDS}
    for comp in order:
        for name, shape, opcode, text in computations[comp]:
            kind = _OPCODES.get(opcode)
            if kind is None:
                continue
            sent = sum(b for o in _operands(text) for b in _array_bytes(shapes.get(o, "")))
            received = max(_array_bytes(shape), default=0)
            stats[kind].count += times[comp]
            stats[kind].bytes += times[comp] * max(sent, received)
    return CollectiveStats(stats, unknown)
