"""Mixed precision and activation checkpointing: exact gradients, the memory they save against the model."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from toy import loss_fn, make_batch, make_layers, reference

from stagewise import Pipeline, PipelineError, spawn
from stagewise.measure.layers import profile_layers
from stagewise.partition.memory import Footprint
from stagewise.runtime.precision import LossScaler
from stagewise.schedules import RECOMPUTE, ScheduleError, build, validate
from stagewise.schedules.recompute import with_recompute

TOL = 1e-10
MODES = ["never", "except_last", "always", 2]


def _grad_err(pipe: Pipeline, ref_grads: dict) -> float:
    return max(((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
               for n, p in pipe.named_parameters())


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "zb-h1", "zbv"])
@pytest.mark.parametrize("devices", [2, 4])
def test_every_checkpointing_mode_gives_exact_gradients(schedule, devices):
    torch.set_default_dtype(torch.float64)
    batch = make_batch(10, 5)
    ref_loss, ref_grads, _ = reference(make_layers(), batch)
    for mode in MODES:
        for m in (1, 3, 4):
            pipe = Pipeline(make_layers(), loss_fn, schedule=schedule, microbatches=m, local_devices=devices,
                            recompute=mode, show_partition=False)
            loss = pipe.train_step(batch)
            assert abs(loss.item() - ref_loss.item()) <= TOL * ref_loss.item(), (mode, m)
            assert _grad_err(pipe, ref_grads) <= TOL, (mode, m)


def test_except_last_and_always_in_the_action_lists():
    one = validate(build("1f1b", 2, 4))
    always = validate(with_recompute(one, "always"))
    last = validate(with_recompute(one, "except_last"))
    count = lambda sc, d: sum(a.op == RECOMPUTE for a in sc.programs[d])  # noqa: E731
    assert [count(always, d) for d in range(2)] == [4, 4]
    # the last stage's backward follows each forward at once: it keeps them all; device 0 keeps none
    assert [count(last, d) for d in range(2)] == [4, 0]
    for prog in always.programs:  # each RECOMPUTE comes right before its backward (lowering may put a RECV between)
        compute = [a for a in prog if a.op in ("F", "B", RECOMPUTE)]
        for k, a in enumerate(compute):
            if a.op == RECOMPUTE:
                assert compute[k + 1].op == "B" and compute[k + 1].microbatch == a.microbatch
    with pytest.raises(ValueError, match="recompute must be one of never, except_last, always"):
        Pipeline(make_layers(), loss_fn, recompute="sometimes", local_devices=2)
    lists = [list(p) for p in always.programs]
    lists[0].insert(0, lists[0].pop(next(i for i, a in enumerate(lists[0]) if a.op == RECOMPUTE)))
    with pytest.raises(ScheduleError, match="recomputes F\\(stage 0, mb 0\\) before it ran"):
        validate(type(always)("bad", 2, 4, (0, 1), lists, lowered=True))


def _predicted(schedule_name: str, mode: str, m: int, batch, balance: list[int]) -> list[float]:
    """The memory model's activation peak per device (no parameters: bytes_per_param=0)."""
    layers = make_layers()
    profiles = profile_layers(layers, batch[0][: (len(batch[0]) + m - 1) // m], loss_fn=loss_fn,
                              labels=batch[1][: (len(batch[0]) + m - 1) // m], repeats=1)
    sc = validate(with_recompute(validate(build(schedule_name, 2, m)), mode))
    fp = Footprint(sc, [p.params for p in profiles], [p.saved_bytes for p in profiles], bytes_per_param=0,
                   input_bytes=[p.input_bytes for p in profiles])
    return fp.devices(balance)


@pytest.mark.parametrize("schedule,balance", [("gpipe", [5, 4]), ("1f1b", [5, 4]), ("zb-h1", [5, 4]),
                                              ("interleaved", [3, 2, 2, 2]), ("zbv", [3, 2, 2, 2])])
def test_saved_activation_bytes_match_the_memory_model(schedule, balance):
    """Bytes are deterministic: the measured peak per device equals the prediction within 5%."""
    torch.set_default_dtype(torch.float64)
    batch = make_batch(8, 5)
    peaks = {}
    for mode in ("never", "always"):
        pipe = Pipeline(make_layers(), loss_fn, schedule=schedule, microbatches=4, partition=balance,
                        local_devices=2, recompute=mode, show_partition=False)
        pipe.train_step(batch)
        measured = [pipe.peak_device_activation_bytes()[d] for d in range(2)]
        predicted = _predicted(schedule, mode, 4, batch, balance)
        for got, want in zip(measured, predicted):
            assert abs(got - want) <= 0.05 * want, (mode, measured, predicted)
        peaks[mode] = measured
    assert peaks["always"][0] < peaks["never"][0]  # device 0 holds several micro-batches: inputs only is less


class HiddenDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: dict) -> dict:
        return {**x, "h": self.drop(x["h"])}


def dropout_run(rank: int, world: int, mode: str) -> dict:
    """A model with dropout: one step, gradients by name (each process draws its own masks in order)."""
    torch.manual_seed(7)
    layers = make_layers()
    layers.insert(4, HiddenDropout())
    layers.insert(2, HiddenDropout())
    pipe = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=4, timeout=30, recompute=mode,
                    show_partition=False)
    torch.manual_seed(11 + rank)
    loss = pipe.train_step(make_batch(8, 5)).item()
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
    pipe.close()
    return {"loss": loss, "grads": grads}


def test_dropout_replays_the_same_mask_under_recompute():
    torch.set_default_dtype(torch.float64)
    plain = spawn(dropout_run, 2, args=("never",), timeout=300)
    redone = spawn(dropout_run, 2, args=("always",), timeout=300)
    for a, b in zip(plain, redone):
        assert a["loss"] == b["loss"]
        for name, g in a["grads"].items():
            assert torch.equal(g, b["grads"][name]), name


def test_bf16_trains_and_halves_the_bytes_between_stages():
    from stagewise.models import config, gpt2_layers, lm_loss

    cfg = config("gpt2-tiny", vocab_size=256, n_positions=32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (8, 32), generator=g)
    batch = (ids, ids.roll(-1, 1))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        pipe = Pipeline(gpt2_layers(cfg), lm_loss, schedule="1f1b", microbatches=2, local_devices=2,
                        precision=precision, show_partition=False,
                        optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3))
        losses = [pipe.train_step(batch).item() for _ in range(30)]
        sent = sum(e.extra.get("bytes", 0) for e in pipe.last_trace().events if e.op in ("SEND_F", "SEND_B"))
        results[precision] = (losses, sent)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert abs(bf16[0][0] - fp32[0][0]) <= 1e-2 * fp32[0][0]
    assert bf16[0][-1] < bf16[0][0] - 1.0  # it learns
    assert bf16[1] * 2 == fp32[1]  # activations and gradients cross in bf16: half the bytes


class InfGrad(torch.autograd.Function):
    """The identity whose backward overflows: an inf gradient whatever the loss scale."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Poison(torch.nn.Module):
    """On stage 1 of the fp16 tests: when `mode` is "grad", the gradient through it overflows; "forward": its
    output (and so the loss) is inf."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = None

    def forward(self, x):
        if self.mode == "grad" and torch.is_grad_enabled():
            return {**x, "h": InfGrad.apply(x["h"])}
        if self.mode == "forward":
            return {**x, "h": x["h"] * torch.tensor(float("inf"))}
        return x


def _fp16_pipe(poison: Poison, at: int = 6, **kw) -> Pipeline:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    layers = [m.float() for m in make_layers()]
    layers.insert(at, poison)  # 6: on stage 1 (of layers 5-9); 3: on stage 0
    return Pipeline(layers, loss_fn, schedule="1f1b", microbatches=2, local_devices=2, precision="fp16",
                    show_partition=False, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), timeout=10, **kw)


def test_fp16_overflow_skips_the_step_everywhere_and_lowers_the_scale():
    poison = Poison()
    pipe = _fp16_pipe(poison)
    batch = make_batch(4, 5)
    pipe.train_step(batch)
    scale = pipe.last_step["loss_scale"]
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    poison.mode = "grad"
    with pytest.warns(UserWarning, match=r"step skipped on every rank.*fp16 overflow; the scale is now 32768, 1 step"):
        pipe.train_step(batch)
    assert all(torch.equal(p, before[n]) for n, p in pipe.named_parameters())  # weights unchanged everywhere
    assert all(s.scale == scale / 2 and s.skips == 1 for s in pipe.loss_scalers.values())
    assert pipe.last_step["overflow_skips"] == 1 and pipe.last_step["overflow"]
    poison.mode = None
    pipe.train_step(batch)
    assert pipe.last_step["skipped"] is None and pipe.last_step["loss_scale"] == scale / 2
    assert pipe.last_step["overflow_skips"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in pipe.named_parameters())  # the next steps go on


def test_fp16_a_non_finite_loss_is_the_nonfinite_policy_s_not_an_overflow():
    """A forward that overflows into the loss: no scale helps, so the scale stays and on_nonfinite decides."""
    poison = Poison()
    pipe = _fp16_pipe(poison, at=3)
    pipe.train_step(make_batch(4, 5))
    poison.mode = "forward"
    with pytest.raises(PipelineError, match=r"non-finite .*first appeared in stage 0's output for micro-batch 0"):
        pipe.train_step(make_batch(4, 5))
    assert all(s.scale == 2.0**16 and s.skips == 0 for s in pipe.loss_scalers.values())

    poison = Poison()
    pipe = _fp16_pipe(poison, at=3, on_nonfinite="skip")
    poison.mode = "forward"
    for _ in range(3):
        with pytest.warns(UserWarning, match=r"step skipped on every rank: a non-finite loss or gradient: it first "
                                             r"appeared in stage 0's output"):
            pipe.train_step(make_batch(4, 5))
        assert "overflow" not in pipe.last_step
    assert all(s.scale == 2.0**16 and s.skips == 0 for s in pipe.loss_scalers.values())


@pytest.mark.parametrize("options,steps,pattern", [
    ({"init_scale": 4.0}, 3, r"overflow even at loss scale 1, the minimum \(min_scale=1\), after 2 skipped steps"),
    ({"init_scale": 2.0**10, "min_scale": 2.0**-30, "max_consecutive_skips": 3}, 4,
     r"overflowed in 4 steps in a row \(max_consecutive_skips=3; the scale fell to 128\)"),
    ({"max_consecutive_skips": 0}, 1, r"overflowed in 1 steps in a row \(max_consecutive_skips=0"),
])
def test_fp16_gradients_overflowing_at_every_scale_stop_naming_where(options, steps, pattern):
    """Without a bound the scale would fall step after step, every step skipped, forever: the scaler gives up."""
    poison = Poison()
    pipe = _fp16_pipe(poison, loss_scale=options)
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    poison.mode = "grad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped steps warn
        for _ in range(steps - 1):
            pipe.train_step(make_batch(4, 5))
            assert "fp16 overflow" in pipe.last_step["skipped"]
    with pytest.raises(PipelineError) as info:
        pipe.train_step(make_batch(4, 5))
    text = str(info.value)
    assert re.search(rf"fp16 loss scaling gave up: .*{pattern}.*In this step it first appeared in the backward of "
                     r"stage 1 \(rank 1\): the gradient of its input for micro-batch \d.*precision='bf16'.*"
                     r"Pipeline\(loss_scale=", text), text
    assert all(torch.equal(p, before[n]) for n, p in pipe.named_parameters())


def test_fp16_loss_scale_options_are_checked_and_old_scaler_states_load():
    for options, pattern in [({"init_scale": 0.5}, r"init_scale must be a finite number >= min_scale \(1\)"),
                             ({"min_scale": 0}, r"min_scale must be a finite number > 0"),
                             ({"max_consecutive_skips": -1}, r"max_consecutive_skips must be an integer >= 0"),
                             ({"growth_factor": 1}, r"growth_factor must be a finite number > 1"),
                             ({"scale": 8}, r"unknown option\(s\) 'scale'; the options are init_scale,"),
                             ([1], r"loss_scale must be a dict")]:
        with pytest.raises(ValueError, match=pattern):
            Pipeline(make_layers(), loss_fn, local_devices=2, precision="fp16", loss_scale=options)
    with pytest.raises(ValueError, match=r"loss_scale is for precision='fp16'.*got precision='bf16'"):
        Pipeline(make_layers(), loss_fn, local_devices=2, precision="bf16", loss_scale={"init_scale": 8.0})
    scaler = LossScaler(min_scale=4.0, max_consecutive_skips=5)
    scaler.update(True)
    assert LossScaler().state_dict().keys() == scaler.state_dict().keys()
    again = LossScaler()
    again.load_state_dict(scaler.state_dict())
    assert again.state_dict() == scaler.state_dict() and again.skips == 1
    old = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "good_steps": 7}
    again = LossScaler(max_consecutive_skips=3)
    again.load_state_dict(old)  # a checkpoint from before the limits existed
    assert (again.scale, again.good_steps, again.skips, again.min_scale, again.max_consecutive_skips) == \
        (1024.0, 7, 0, 1.0, 3)
