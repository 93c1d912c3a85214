"""Timeline visualisation: text for terminals, PNG figures, and Chrome / Perfetto traces.

Nothing here imports torch; matplotlib is imported only when a PNG is drawn.
"""

from stagewise.viz.png import render_png
from stagewise.viz.text import render_text
from stagewise.viz.trace import to_chrome_trace, write_chrome_trace

__all__ = ["render_png", "render_text", "to_chrome_trace", "write_chrome_trace"]
