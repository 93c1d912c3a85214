"""Behavioural tests of the timeline renderers: text, PNG and Chrome trace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stagewise.schedules import Costs, Event, Timeline, build, simulate
from stagewise.viz import render_png, render_text, to_chrome_trace, write_chrome_trace

ROW = re.compile(r"^dev +(\d+) \|(.*)\|$")


def one_f_one_b() -> Timeline:
    return simulate(build("1f1b", 4, 8), Costs()).timeline


def zbv() -> Timeline:
    return simulate(build("zbv", 4, 8), Costs(f=1, b=2, i=1, w=1)).timeline


def measured() -> Timeline:
    """A small hand-made measured timeline: seconds, not starting at 0, with extras."""
    t0 = 1000.0
    events = [
        Event(0, t0, t0 + 0.010, "F", 0, 0),
        Event(1, t0 + 0.012, t0 + 0.020, "F", 1, 0, extra={"bytes_sent": 4096}),
        Event(1, t0 + 0.020, t0 + 0.036, "B", 1, 0, extra={"shape": (2, 3)}),
        Event(0, t0 + 0.038, t0 + 0.058, "B", 0, 0),
        Event(0, t0 + 0.058, t0 + 0.060, "STEP", 0, -1, version=1),
    ]
    return Timeline(2, events, title="measured", unit="s", num_stages=2)


def rows(text: str) -> dict[int, str]:
    out = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def test_text_one_row_per_device_with_bubble_and_first_forward() -> None:
    text = render_text(one_f_one_b(), width=100)
    r = rows(text)
    assert sorted(r) == [0, 1, 2, 3]
    assert r[0].startswith("F0")
    assert not r[1].startswith("F")  # device 1 waits for device 0's first forward
    assert "." in r[0] and "." in r[3]  # the 1F1B bubble
    # The last device starts only after the three devices before it.
    assert r[3].index("F0") > r[2].index("F0") > r[1].index("F0") > r[0].index("F0") == 0
    assert "B7" in r[0]
    assert "33 cost units" in text
    assert "legend:" in text


@pytest.mark.parametrize("width", [12, 40, 100, 157])
def test_text_width_respected(width: int) -> None:
    for tl in (one_f_one_b(), zbv(), measured()):
        r = rows(render_text(tl, width=width))
        assert len(r) == tl.num_devices
        assert all(len(body) == width for body in r.values())


def test_text_idle_fraction_matches_timeline() -> None:
    tl = one_f_one_b()
    r = rows(render_text(tl, width=330))  # 10 columns per cost unit: exact cells
    for d, body in r.items():
        assert body.count(".") / len(body) == pytest.approx(tl.bubble_per_device()[d], abs=0.01)


def test_text_later_chunks_lowercase_and_deterministic() -> None:
    tl = zbv()
    text = render_text(tl, width=100)
    assert text == render_text(tl, width=100)
    assert re.search(r"[fiw]\d", text)  # later chunk of the V in lowercase
    assert "later chunk" in text


def test_text_measured_seconds_and_color() -> None:
    tl = measured()
    text = render_text(tl, width=60)
    r = rows(text)
    assert r[0].startswith("F0") and r[1].startswith(".")
    assert "0.06 s" in text
    colored = render_text(tl, width=60, color=True)
    assert "\033[" in colored
    assert re.sub(r"\033\[[0-9;]*m", "", colored) == text


def test_text_rejects_bad_width_and_handles_empty() -> None:
    with pytest.raises(ValueError):
        render_text(one_f_one_b(), width=0)
    r = rows(render_text(Timeline(2, []), width=10))
    assert r == {0: "." * 10, 1: "." * 10}


def test_png_single_and_stacked(tmp_path: Path) -> None:
    one = render_png(zbv(), str(tmp_path / "one.png"))
    two = render_png([one_f_one_b(), measured()], str(tmp_path / "two.png"), title="sim vs measured")
    for path in (one, two):
        data = Path(path).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 1000
    # Two stacked subplots make a taller figure than one (PNG height lives at bytes 20..24 of IHDR).
    height = {p: int.from_bytes(Path(p).read_bytes()[20:24], "big") for p in (one, two)}
    assert height[two] > height[one]


def test_chrome_trace_events_match_timeline() -> None:
    tls = [one_f_one_b(), measured()]
    trace = to_chrome_trace(tls)
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == sum(len(t.events) for t in tls)
    for pid, tl in enumerate(tls, start=1):
        names = [e for e in events if e["ph"] == "M" and e["pid"] == pid]
        assert {"name": tl.title} in [e["args"] for e in names if e["name"] == "process_name"]
        threads = {e["tid"]: e["args"]["name"] for e in names if e["name"] == "thread_name"}
        assert threads == {d: f"device {d}" for d in range(tl.num_devices)}
        mine = [e for e in complete if e["pid"] == pid]
        assert {e["tid"] for e in mine} == {e.device for e in tl.events}
        scale = 1e3 if tl.unit == "" else 1e6
        expected = sorted((e.device, e.label, round((e.start - tl.origin) * scale, 6),
                           round((e.end - e.start) * scale, 6)) for e in tl.events)
        got = sorted((e["tid"], e["name"], round(e["ts"], 6), round(e["dur"], 6)) for e in mine)
        assert got == expected
        assert min(e["ts"] for e in mine) == 0
    f0 = next(e for e in complete if e["pid"] == 1 and e["name"] == "F0" and e["tid"] == 0)
    assert f0["cat"] == "F" and f0["dur"] == 1000.0
    assert f0["args"] == {"stage": 0, "microbatch": 0, "version": 0}
    sent = next(e for e in complete if e["pid"] == 2 and e["name"] == "F0" and e["tid"] == 1)
    assert sent["args"]["bytes_sent"] == 4096 and sent["args"]["stage"] == 1
    step = next(e for e in complete if e["pid"] == 2 and e["cat"] == "STEP")
    assert step["name"] == "S" and step["args"]["version"] == 1
    shaped = next(e for e in complete if "shape" in e["args"])
    assert shaped["args"]["shape"] == [2, 3]
    assert json.loads(json.dumps(trace)) == trace  # plain JSON data throughout


def test_write_chrome_trace(tmp_path: Path) -> None:
    path = write_chrome_trace(zbv(), str(tmp_path / "trace.json"))
    data = json.loads(Path(path).read_text())
    assert len([e for e in data["traceEvents"] if e["ph"] == "X"]) == len(zbv().events)
