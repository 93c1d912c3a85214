"""Chrome / Perfetto trace-event JSON for timelines (open in chrome://tracing or ui.perfetto.dev)."""

from __future__ import annotations

import json
from typing import Any

from stagewise.schedules.timeline import Timeline

# Microseconds per unit of a timeline; simulated cost units ("") are drawn as milliseconds.
US_PER_UNIT: dict[str, float] = {"": 1e3, "s": 1e6, "ms": 1e3, "us": 1.0}


def to_chrome_trace(timelines: Timeline | list[Timeline]) -> dict[str, Any]:
    """Trace-event JSON: a process per timeline, a thread per device, an "X" event per action.

    Times are microseconds since the timeline's origin; one simulated cost unit counts as 1 ms.
    Each event's args hold its stage, micro-batch, version and measured extras. An overlapped
    F+B pair is an event named like `F3+B1` (category OVERLAP_F_B) that encloses its two
    members, so Perfetto draws it as a parent slice with the members below it.
    """
    tls = [timelines] if isinstance(timelines, Timeline) else list(timelines)
    events: list[dict[str, Any]] = []
    for index, tl in enumerate(tls):
        pid = index + 1
        if tl.unit not in US_PER_UNIT:
            raise ValueError(f"timeline {tl.title!r} has unknown unit {tl.unit!r}; expected one of {list(US_PER_UNIT)}")
        scale, origin = US_PER_UNIT[tl.unit], tl.origin
        name = tl.title or f"timeline {index}"
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": index}})
        devices = max([tl.num_devices] + [e.device + 1 for e in tl.events])
        for d in range(devices):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": d, "args": {"name": f"device {d}"}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": d, "args": {"sort_index": d}})
        for e in sorted(tl.events, key=lambda e: (e.device, e.start, e.op != "OVERLAP_F_B", e.end, e.stage,
                                                  e.microbatch)):
            args = {key: _json_safe(value) for key, value in e.extra.items()}
            args.update(stage=e.stage, microbatch=e.microbatch, version=e.version)
            events.append({
                "ph": "X", "name": e.label, "cat": e.op, "pid": pid, "tid": e.device,
                "ts": (e.start - origin) * scale, "dur": (e.end - e.start) * scale, "args": args,
            })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timelines: Timeline | list[Timeline], path: str) -> str:
    """Write `to_chrome_trace(timelines)` as JSON to `path` and return `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_chrome_trace(timelines), f)
    return path


def _json_safe(value: Any) -> Any:
    """`value` as plain JSON data: tuples become lists, scalars with `.item()` are unwrapped, the rest strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy / torch scalars
        try:
            return _json_safe(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)
