"""Schedules as files: the CSV form `torch.distributed.pipelining` writes (`_dump_csv`), one row per device.

A row lists one device's actions in order, one per cell, written as torch writes them:
`{stage}{op}{micro-batch}` with op F (forward), B (full backward), I (input gradient) or W
(weight gradient), such as `0F3`, `1I2`, `1W2`, `0B1`; an overlapped pair is
`({stage}F{mb};{stage}B{mb})OVERLAP_F_B`, its forward then its full backward. Reading also
takes what else torch writes: empty cells (its idle slots) are skipped; communication and
sharding cells (`SEND_F`, `RECV_F`, `SEND_B`, `RECV_B`, `UNSHARD`, `RESHARD`, `REDUCE_GRAD`) are
read and dropped, since `lower()` derives the communication again (and can prove it free of
deadlock). Lines starting with `#` are comments.

Everything else is inferred: which device holds which stage (the row whose cells name it;
every device holds the same number of stages, every stage lives on one device), the stage
and micro-batch counts (the largest named, plus one), whether the backward is split (any I
or W), and the name (the file's stem unless given). Each device ends with the optimizer
step of a synchronous schedule, which the file leaves implied. A file that cannot be a
schedule is refused with a ScheduleError naming its row and column (1-based) and the fault;
`load` also validates, so a schedule that cannot run is refused the same way.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from stagewise.schedules.actions import COMM_OPS, OVERLAP_F_B, STEP, Action, B, F, I, ScheduleError, W
from stagewise.schedules.schedule import Schedule

_COMPUTE = re.compile(r"(\d+)(F|I|B|W)(\d+)")
_DROPPED = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD)(\d*)")
_PAIR = re.compile(r"\((.*)\)(\w+)")
_FORM = "{stage}{F|I|B|W}{micro-batch} such as 0F3, or (0F3;7B1)OVERLAP_F_B"


def dumps(schedule: Schedule) -> str:
    """The CSV text of a synchronous schedule's compute actions (its communication is left out)."""
    if schedule.asynchronous:
        raise ScheduleError(f"{schedule.name}: an asynchronous schedule names weight versions and optimizer steps "
                            "in its lists, which the CSV form cannot hold; only synchronous schedules are written")
    out = io.StringIO()
    writer = csv.writer(out)
    for d, prog in enumerate(schedule.programs):
        work = [a for a in prog if a.op not in COMM_OPS]
        if work and work[-1] == _flush_step(schedule, d):
            work = work[:-1]
        cells: list[str] = []
        k = 0
        while k < len(work):
            a = work[k]
            if a.op == OVERLAP_F_B:
                f, b = work[k + 1], work[k + 2]
                cells.append(f"({_cell(f)};{_cell(b)}){OVERLAP_F_B}")
                k += 3
                continue
            if a.op not in (F, B, I, W):
                raise ScheduleError(f"{schedule.name}: device {d} action #{prog.index(a)} {a} has no CSV form "
                                    "(a synchronous schedule steps once, at the end of each device)",
                                    device=d, index=prog.index(a))
            if a.version:
                raise ScheduleError(f"{schedule.name}: device {d} action {a} uses weight version {a.version}, "
                                    "which the CSV form cannot hold", device=d, index=prog.index(a))
            cells.append(_cell(a))
            k += 1
        writer.writerow(cells)
    return out.getvalue()


def save(schedule: Schedule, path: str | os.PathLike) -> str:
    """Write `dumps(schedule)` to `path` (torch's `_load_csv` reads it too); return the path."""
    text = dumps(schedule)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def load(path: str | os.PathLike, name: str | None = None, check: bool = True) -> Schedule:
    """The schedule in the CSV file `path` (see the module's docstring for the form), validated when `check`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ScheduleError(f"cannot read schedule file {os.fspath(path)}: {err.strerror or err}") from err
    return loads(text, name=name or Path(path).stem, source=os.fspath(path), check=check)


def loads(text: str, name: str = "schedule", source: str = "schedule text", check: bool = True) -> Schedule:
    """The schedule in CSV `text`; errors name `source`, the row and the column."""
    rows: list[tuple[int, list[str]]] = []  # (line number, cells) of each device
    for line, cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        if cells and cells[0].lstrip().startswith("#"):
            continue
        rows.append((line, cells))
    while rows and not any(c.strip() for c in rows[-1][1]):
        rows.pop()
    if not rows:
        raise ScheduleError(f"{source}: no rows; a schedule file has one row of actions per device")

    def fail(line: int, col: int | None, why: str) -> ScheduleError:
        where = f"row {line}" + (f", column {col}" if col is not None else "")
        return ScheduleError(f"{source} {where}: {why}")

    lists: list[list[Action]] = []
    cells_of: list[list[tuple[int, int | None]]] = []  # per device, per action: (line, column) in the file
    where_stage: dict[int, tuple[int, int, int]] = {}  # stage -> (device, line, column)
    for d, (line, cells) in enumerate(rows):
        acts: list[Action] = []
        at: list[tuple[int, int | None]] = []
        for col, raw in enumerate(cells, start=1):
            cell = raw.strip()
            if not cell or _DROPPED.fullmatch(cell):
                continue
            parsed = _parse(cell, lambda why, c=col, ln=line: fail(ln, c, why))
            for a in parsed:
                if a.op != OVERLAP_F_B:
                    seen = where_stage.setdefault(a.stage, (d, line, col))
                    if seen[0] != d:
                        raise fail(line, col, f"{cell!r} runs stage {a.stage} on device {d}, but row {seen[1]} "
                                   f"(device {seen[0]}, column {seen[2]}) already runs it there; a stage lives on "
                                   "one device")
                acts.append(a)
                at.append((line, col))
        lists.append(acts)
        cells_of.append(at)
    P = len(rows)
    for d, (line, _) in enumerate(rows):
        if not lists[d]:
            raise fail(line, None, f"device {d} runs no action; every row needs at least one ({_FORM})")
    S = max(where_stage) + 1
    for s in range(S):
        if s not in where_stage:
            raise ScheduleError(f"{source}: stage {s} is in no row, but stages up to {S - 1} are; every stage from 0 "
                                "on must live on a device")
    placement = tuple(where_stage[s][0] for s in range(S))
    held = [placement.count(d) for d in range(P)]
    if len(set(held)) > 1:
        d = next(d for d in range(P) if held[d] != held[0])
        raise fail(rows[d][0], None, f"device {d} holds {held[d]} stages but device 0 holds {held[0]}; every device "
                   "must hold the same number of stages")
    m = 1 + max(a.microbatch for acts in lists for a in acts)
    for d, acts in enumerate(lists):  # the synchronous flush: one optimizer step per device, at its end
        acts.append(Action(STEP, min(s for s in range(S) if placement[s] == d), -1, 1))
        cells_of[d].append((rows[d][0], None))
    split = any(a.op in (I, W) for acts in lists for a in acts)
    schedule = Schedule(name, P, m, placement, lists, split_backward=split)
    if check:
        from stagewise.schedules.validate import validate

        try:
            validate(schedule)
        except ScheduleError as err:
            if err.device is None:
                raise ScheduleError(f"{source}: {err}") from None
            line = rows[err.device][0]
            col = cells_of[err.device][err.index][1] if err.index is not None else None
            if col is None:
                where = f"row {line}" if err.index is None else f"row {line} (the optimizer step implied at its end)"
                raise ScheduleError(f"{source} {where}: {err}") from None
            cell = rows[err.device][1][col - 1].strip()
            raise ScheduleError(f"{source} row {line}, column {col} ({cell!r}): {err}") from None
    return schedule


def _cell(a: Action) -> str:
    return f"{a.stage}{a.op}{a.microbatch}"


def _flush_step(schedule: Schedule, d: int) -> Action:
    """The optimizer step a file leaves implied at the end of device d."""
    return Action(STEP, min(schedule.stages_of(d)), -1, 1)


def _parse(cell: str, fail) -> list[Action]:
    """A cell's actions: one, or an overlapped pair's three rows."""
    found = _COMPUTE.fullmatch(cell)
    if found:
        return [Action(found.group(2), int(found.group(1)), int(found.group(3)))]
    pair = _PAIR.fullmatch(cell)
    if pair:
        if pair.group(2) != OVERLAP_F_B:
            raise fail(f"{cell!r}: {pair.group(2)!r} is no action that groups others (only {OVERLAP_F_B} is)")
        parts = [p.strip() for p in pair.group(1).split(";")]
        members = [_COMPUTE.fullmatch(p) for p in parts]
        if len(parts) != 2 or not all(members) or members[0].group(2) != F or members[1].group(2) != B:
            raise fail(f"{cell!r}: an {OVERLAP_F_B} pairs exactly a forward then a full backward, such as "
                       f"(0F3;7B1){OVERLAP_F_B}")
        return [Action(OVERLAP_F_B, -1, -1)] + [Action(x.group(2), int(x.group(1)), int(x.group(3))) for x in members]
    if re.fullmatch(r"\d+(F|I|B|W)", cell):
        raise fail(f"{cell!r} names no micro-batch (expected {_FORM})")
    if re.fullmatch(r"\d*STEP\d*", cell):
        raise fail(f"{cell!r}: optimizer steps are implied at the end of each row, not written")
    raise fail(f"{cell!r} is not an action (expected {_FORM})")
