"""Mixed precision and activation checkpointing: exact gradients, the memory they save against the model."""

from __future__ import annotations

import pytest
import torch
from toy import loss_fn, make_batch, make_layers, reference

from stagewise import Pipeline, spawn
from stagewise.partition.memory import Footprint
from stagewise.partition.profile import profile_layers
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
                            activation_checkpointing=mode, show_partition=False)
            loss = pipe.train_step(batch)
            assert abs(loss.item() - ref_loss.item()) <= TOL * ref_loss.item(), (mode, m)
            assert _grad_err(pipe, ref_grads) <= TOL, (mode, m)


def test_except_last_and_always_in_the_action_lists():
    one = validate(build("1f1b", 2, 4))
    always = validate(with_recompute(one, "always"))
    last = validate(with_recompute(one, "except_last"))
    count = lambda sc, d: sum(a.op == RECOMPUTE for a in sc.actions[d])  # noqa: E731
    assert [count(always, d) for d in range(2)] == [4, 4]
    # the last stage's backward follows each forward at once: it keeps them all; device 0 keeps none
    assert [count(last, d) for d in range(2)] == [4, 0]
    for prog in always.actions:  # each RECOMPUTE comes right before its backward (lowering may put a RECV between)
        compute = [a for a in prog if a.op in ("F", "B", RECOMPUTE)]
        for k, a in enumerate(compute):
            if a.op == RECOMPUTE:
                assert compute[k + 1].op == "B" and compute[k + 1].microbatch == a.microbatch
    with pytest.raises(ValueError, match="activation_checkpointing must be one of never, except_last, always"):
        Pipeline(make_layers(), loss_fn, activation_checkpointing="sometimes", local_devices=2)
    lists = [list(p) for p in always.actions]
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
                        local_devices=2, activation_checkpointing=mode, show_partition=False)
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
    pipe = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=4, timeout=30, activation_checkpointing=mode,
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


def test_fp16_overflow_skips_the_step_everywhere_and_lowers_the_scale():
    torch.set_default_dtype(torch.float32)
    poison = {"on": False}

    class MaybeInf(torch.nn.Module):
        def forward(self, x):
            if poison["on"] and torch.is_grad_enabled():
                return {**x, "h": x["h"] * torch.tensor(float("inf"))}
            return x

    torch.manual_seed(0)
    layers = [m.float() for m in make_layers()]
    layers.insert(6, MaybeInf())  # on stage 1
    pipe = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=2, local_devices=2, precision="fp16",
                    show_partition=False, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    batch = make_batch(4, 5)
    pipe.train_step(batch)
    scale = pipe.last_step["loss_scale"]
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    poison["on"] = True
    with pytest.warns(UserWarning, match="step skipped on every rank.*fp16 overflow"):
        pipe.train_step(batch)
    assert all(torch.equal(p, before[n]) for n, p in pipe.named_parameters())  # weights unchanged everywhere
    assert all(s.scale == scale / 2 for s in pipe.loss_scalers.values())
    poison["on"] = False
    pipe.train_step(batch)
    assert "skipped" not in pipe.last_step and pipe.last_step["loss_scale"] == scale / 2
    assert any(not torch.equal(p, before[n]) for n, p in pipe.named_parameters())  # the next steps go on
