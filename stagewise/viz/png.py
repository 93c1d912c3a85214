"""PNG rendering of timelines in the style of the GPipe / 1F1B paper figures (matplotlib, imported lazily)."""

from __future__ import annotations

from stagewise.schedules.timeline import Timeline
from stagewise.viz.text import OP_NAMES, PAIR, in_pair, is_later_chunk, op_letter

# (first chunk, later chunk) fill colors per op letter.
COLORS: dict[str, tuple[str, str]] = {
    "F": ("#5b8fd6", "#24518f"),
    "B": ("#4fae5a", "#256b2d"),
    "I": ("#b5e3a1", "#7cb866"),
    "W": ("#f2a541", "#c06f0c"),
    "S": ("#a0a0a0", "#6e6e6e"),
    "R": ("#b07cc6", "#7d4a94"),
    "C": ("#8fd6d0", "#3f9a93"),
}
_OTHER = ("#d9d9d9", "#a6a6a6")
_PAIR_EDGE = "#c2185b"  # the frame of an overlapped F+B pair
_TIE_FACE = "#e6e6e6"  # the tied-parameter sync inside a simulated STEP (its wait for the other holders included)
_LIGHT = {"I"}  # light fills get dark text
_FIG_WIDTH = 13.0  # inches
_DPI = 120
_FONT = 7.0  # points


def render_png(timelines: Timeline | list[Timeline], path: str, title: str | None = None) -> str:
    """Draw one or several timelines stacked vertically (one subplot each) into the PNG file `path`.

    A row per device (device 0 on top), a box per action colored by op with its micro-batch
    number inside when it fits; actions of later virtual_stages (stage >= number of devices) are darker
    and hatched; idle time stays white. An overlapped F+B pair is a thick magenta frame around
    its two members: side by side when they ran one after the other, the forward in the upper
    and the backward in the lower half when they overlapped. A simulated STEP that syncs a tied
    parameter first (extras `tie_wait_s`, `tie_sync_s`) shows that part cross-hatched before its
    optimizer step; a measured STEP holds both too, undivided. Returns `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    tls = [timelines] if isinstance(timelines, Timeline) else list(timelines)
    if not tls:
        raise ValueError("no timeline to draw")
    rows = [max([t.num_devices] + [e.device + 1 for e in t.events]) for t in tls]
    heights = [0.32 * n + 0.9 for n in rows]
    fig, axes = plt.subplots(len(tls), 1, figsize=(_FIG_WIDTH, sum(heights) + 0.5 + (0.3 if title else 0.0)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False, dpi=_DPI)
    ops_seen: set[str] = set()
    later_seen = pair_seen = tie_seen = False
    for ax, tl, n in zip(axes[:, 0], tls, rows):
        origin, span = tl.origin, tl.makespan
        xmax = span if span > 0 else 1.0
        ax.set_xlim(0, xmax)
        ax.set_ylim(n, 0)  # device 0 on top
        # Width of one time unit in points, to decide whether a label fits in its box.
        axes_width_pt = ax.get_position().width * fig.get_figwidth() * 72
        pt_per_unit = axes_width_pt / xmax
        # Zero-length actions (a free optimizer step in a simulation) take no time and are not drawn.
        drawn = [e for e in tl.events if e.end > e.start]
        pairs = [e for e in drawn if e.op == PAIR]
        for e in sorted(drawn, key=lambda e: (e.device, e.start, e.stage, e.microbatch)):
            if e.op == PAIR:
                continue
            letter = op_letter(e.op)
            later = is_later_chunk(e, tl)
            ops_seen.add(letter)
            later_seen |= later
            face = COLORS.get(letter, _OTHER)[1 if later else 0]
            x, w = e.start - origin, e.end - e.start
            y, h = e.device + 0.1, 0.8
            if in_pair(e) and _overlapped(e, pairs):  # the forward on top, the backward below
                h = 0.4
                y += 0.0 if e.op == "F" else 0.4
            ax.add_patch(Rectangle((x, y), w, h, facecolor=face, edgecolor="black",
                                   linewidth=0.5, hatch="///" if later else None))
            tie = float(e.extra.get("tie_wait_s", 0.0)) + float(e.extra.get("tie_sync_s", 0.0))
            if e.op == "STEP" and tie > 0:
                tie_seen = True
                ax.add_patch(Rectangle((x, y), min(tie, w), h, facecolor=_TIE_FACE, edgecolor="black",
                                       linewidth=0.5, hatch="xx"))
            text = "" if e.op in ("STEP", "REDUCE") else str(e.microbatch)
            if text and w * pt_per_unit >= len(text) * _FONT * 0.62 + 2:
                ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=_FONT * (h / 0.8) ** 0.5,
                        color="black" if letter in _LIGHT and not later else "white",
                        fontweight="bold", bbox=_text_box(face, later))
        for e in pairs:
            pair_seen = True
            ax.add_patch(Rectangle((e.start - origin, e.device + 0.05), e.end - e.start, 0.9, facecolor="none",
                                   edgecolor=_PAIR_EDGE, linewidth=1.8, zorder=5))
        ax.set_yticks([d + 0.5 for d in range(n)], [f"device {d}" for d in range(n)])
        ax.tick_params(axis="y", length=0)
        for d in range(1, n):
            ax.axhline(d, color="#e0e0e0", linewidth=0.6, zorder=0)
        unit = "s" if tl.unit == "s" else (tl.unit or "cost units")
        ax.set_xlabel(f"time ({unit})" + (" since start" if tl.unit == "s" else ""))
        busy = 1.0 - sum(tl.bubble_per_device()) / len(tl.bubble_per_device()) if tl.num_devices else 0.0
        ax.set_title(f"{tl.title or 'timeline'}  (makespan {span:.4g} {unit}, devices busy {busy:.0%})",
                     fontsize=9, loc="left")
        ax.set_facecolor("white")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=COLORS.get(op, _OTHER)[0], edgecolor="black", linewidth=0.5, label=OP_NAMES.get(op, op))
               for op in sorted(ops_seen, key=lambda o: list(COLORS).index(o) if o in COLORS else len(COLORS))]
    if later_seen:
        handles.append(Patch(facecolor="#707070", edgecolor="black", linewidth=0.5, hatch="///",
                             label="later chunk (darker, hatched)"))
    if tie_seen:
        handles.append(Patch(facecolor=_TIE_FACE, edgecolor="black", linewidth=0.5, hatch="xx",
                             label="tied-parameter sync in the step (wait, all-reduce)"))
    if pair_seen:
        handles.append(Patch(facecolor="none", edgecolor=_PAIR_EDGE, linewidth=1.8, label=OP_NAMES["P"].split(" (")[0]
                             + " (one action)"))
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1), h_pad=1.2)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _overlapped(member, pairs) -> bool:
    """Whether the pair containing `member` ran its two members together."""
    for p in pairs:
        if p.device == member.device and p.start <= member.start < p.end:
            return bool(p.extra.get("overlapped"))
    return False


def _text_box(face: str, later: bool) -> dict | None:
    """A backing box in the fill color so hatching does not cross the micro-batch number."""
    if not later:
        return None
    return {"boxstyle": "square,pad=0.05", "facecolor": face, "edgecolor": "none"}
