"""A test-only crash, injected from outside the library: with this folder on PYTHONPATH, Python imports this module at
start-up, and `STAGEWISE_TEST_KILL_AFTER_STEP=RANK:STEP` makes that rank SIGKILL itself once STEP training steps are
done (when the next one starts), in a run's first attempt only (torchrun's restarts set TORCHELASTIC_RESTART_COUNT):
a crash as a real one looks, mid-run, for the restart and resume tests."""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("STAGEWISE_TEST_KILL_AFTER_STEP")
if _spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    _who, _after = (int(x) for x in _spec.split(":"))
    if int(os.environ.get("RANK", "0")) == _who:
        from stagewise.pipeline import Pipeline

        _train_step = Pipeline.train_step
        _calls = [0]

        def _train_step_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            _calls[0] += 1
            if _calls[0] > _after:
                os.kill(os.getpid(), signal.SIGKILL)
            return _train_step(self, *args, **kwargs)

        Pipeline.train_step = _train_step_then_die  # type: ignore[method-assign]
