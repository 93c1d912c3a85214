"""Plain-text (terminal) rendering of a timeline: one row of characters per device."""

from __future__ import annotations

import math

from stagewise.schedules.timeline import Event, Timeline

IDLE = "."
OP_NAMES: dict[str, str] = {
    "F": "forward",
    "B": "backward",
    "I": "backward input-grad",
    "W": "backward weight-grad",
    "S": "optimizer step",
    "R": "gradient reduction (data parallel)",
    "C": "recompute (activation checkpointing)",
    "P": "F+B pair (one overlapped action, labelled like F3+b1)",
}
ANSI: dict[str, str] = {"F": "34", "B": "32", "I": "92", "W": "33", "S": "90", "R": "35", "P": "95", "C": "36"}
PAIR = "OVERLAP_F_B"
_RESET = "\033[0m"


def op_letter(op: str) -> str:
    """The single letter of an op: F, B, I, W, S for STEP, R for REDUCE, or P for an overlapped F+B pair."""
    if op == PAIR:
        return "P"
    if op == "RECOMPUTE":
        return "C"
    return "S" if op == "STEP" else op[:1]


def pair_label(event: Event, timeline: Timeline) -> str:
    """An overlapped pair's label from its members, such as F3+b1 (lowercase: a later chunk)."""
    parts = []
    for op, stage, mb in event.extra.get("pair", ()):
        later = timeline.num_stages > timeline.num_devices and stage >= timeline.num_devices
        parts.append(f"{op}{mb}".lower() if later else f"{op}{mb}")
    return "+".join(parts) or "F+B"


def in_pair(event: Event) -> bool:
    """Whether the event is a member of an overlapped pair (drawn inside the pair's event)."""
    return bool(event.extra.get("in_pair"))


def is_later_chunk(event: Event, timeline: Timeline) -> bool:
    """Whether the event runs a later model chunk on its device (stage index >= number of devices)."""
    return timeline.num_stages > timeline.num_devices and event.stage >= timeline.num_devices


def cell_label(event: Event, cells: int, later: bool, timeline: Timeline | None = None) -> str:
    """The event's text over `cells` columns: its label padded with blanks, or just its op letter if too narrow."""
    letter = op_letter(event.op)
    label = event.label if event.op not in ("STEP", "REDUCE") else letter
    if event.op == PAIR:
        label = pair_label(event, timeline) if timeline is not None else event.label
    elif later and letter not in ("S", "R"):
        letter, label = letter.lower(), label.lower()
    text = label if len(label) <= cells else letter
    return text[:cells].ljust(cells)


def _cell(t: float, origin: float, span: float, width: int) -> int:
    return min(width, max(0, math.floor((t - origin) / span * width + 0.5)))


def _format_time(t: float) -> str:
    return f"{t:.4g}"


def render_text(timeline: Timeline, width: int = 100, color: bool = False) -> str:
    """Render `timeline` as text: a row per device, `width` columns spanning the makespan, `.` for idle time.

    Each action shows its label (`F3`, `B12`, `S` for a step), or only its op letter when it covers
    too few columns; actions of later virtual_stages (stage >= number of devices) are lowercase. An
    overlapped F+B pair is one box labelled with both members (`F3+b1`, or `P` when narrow),
    whether its members ran one after the other or together. Below the rows come a time axis
    and a legend. `color=True` adds ANSI colors per op.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    num_devices = max([timeline.num_devices] + [e.device + 1 for e in timeline.events])
    origin, span = timeline.origin, timeline.makespan
    rows: list[list[str]] = [[IDLE] * width for _ in range(num_devices)]
    ops: list[list[str | None]] = [[None] * width for _ in range(num_devices)]
    # Longest first so that actions too short for a column of their own only take idle columns;
    # zero-length actions (a free optimizer step in a simulation) take no time and are not drawn.
    events = sorted((e for e in timeline.events if e.end > e.start and not in_pair(e)),
                    key=lambda e: (-(e.end - e.start), e.device, e.start, e.stage, e.microbatch))
    for e in events if span > 0 else []:
        c0, c1 = _cell(e.start, origin, span, width), _cell(e.end, origin, span, width)
        row, row_ops = rows[e.device], ops[e.device]
        if c1 <= c0:
            candidates = [c for c in (c0, c0 - 1) if 0 <= c < width and row_ops[c] is None]
            if not candidates:
                continue
            c0, c1 = candidates[0], candidates[0] + 1
        row[c0:c1] = cell_label(e, c1 - c0, is_later_chunk(e, timeline), timeline)
        row_ops[c0:c1] = [op_letter(e.op)] * (c1 - c0)

    name_width = len(str(num_devices - 1))
    lines = []
    for d in range(num_devices):
        body = "".join(rows[d]) if not color else _colorize(rows[d], ops[d])
        lines.append(f"dev {d:>{name_width}} |{body}|")

    indent = " " * (len("dev  |") + name_width)
    unit = timeline.unit or "cost units"
    right = f"{_format_time(span)} {unit}"
    left = "0"
    axis = left + right.rjust(width - len(left)) if width >= len(left) + len(right) + 1 else right
    lines.append(indent + axis)

    present = sorted({op_letter(e.op) for e in events}, key=lambda x: list(OP_NAMES).index(x)
                     if x in OP_NAMES else len(OP_NAMES))
    legend = [f"{op} {OP_NAMES.get(op, op)}" for op in present] + [f"{IDLE} idle"]
    if any(is_later_chunk(e, timeline) for e in events):
        legend.append(f"lowercase: later chunk (stage >= {timeline.num_devices})")
    lines.append("legend: " + ", ".join(legend) + "; digits: micro-batch")
    return "\n".join(lines)


def _colorize(cells: list[str], ops: list[str | None]) -> str:
    """Wrap runs of columns of the same op in ANSI color codes."""
    out: list[str] = []
    current: str | None = None
    for ch, op in zip(cells, ops):
        if op != current:
            if current is not None:
                out.append(_RESET)
            if op is not None:
                out.append(f"\033[{ANSI.get(op, '0')}m")
            current = op
        out.append(ch)
    if current is not None:
        out.append(_RESET)
    return "".join(out)
