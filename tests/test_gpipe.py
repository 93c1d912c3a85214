"""stagewise.GPipe: torchgpipe's one-process pipeline, called like a module (CPU devices, float64 for parity)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from switches import short_switches
from torch import nn

import stagewise
from stagewise import GPipe, PipelineError
from stagewise.models import config, gpt2_layers, lm_loss
from stagewise.partition import PartitionError
from stagewise.runtime.batchnorm import DeferredBatchNorm
from stagewise.runtime.rng import RandomDraws
from stagewise.runtime.stage import is_recomputing
from stagewise.runtime.transport import LocalHub, LocalTransport
from stagewise.schedules import RECOMPUTE, build, validate
from stagewise.schedules.recompute import recompute_microbatches

TOL = 1e-10
CPU4 = ["cpu"] * 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)  # conftest restores the default afterwards


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def grad_error(model: nn.Module, plain: nn.Module) -> float:
    ref = dict(plain.named_parameters())
    return max(rel(p.grad, ref[name].grad) for name, p in model.named_parameters())


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("balance", [[2, 2, 2, 1], [7]])
def test_output_loss_and_every_gradient_equal_the_plain_module(balance, chunks, checkpoint):
    plain = mlp()
    model = GPipe(copy.deepcopy(plain), balance, devices=CPU4, chunks=chunks, checkpoint=checkpoint,
                  show_partition=False)
    torch.manual_seed(1)
    x, y = torch.randn(11, 8), torch.randn(11, 4)  # 11 samples: uneven micro-batches for chunks 2 and 4
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = model(xg)
    loss = ((out - y) ** 2).mean()
    loss.backward()
    ref = plain(xr)
    ref_loss = ((ref - y) ** 2).mean()
    ref_loss.backward()
    assert out.shape == ref.shape and out.grad_fn is not None
    assert rel(out, ref) <= TOL and abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert grad_error(model, plain) <= TOL
    assert rel(xg.grad, xr.grad) <= TOL  # the input's gradient too


def test_gpt2_with_its_tie_across_partitions_trains_like_the_plain_module():
    """The embedding/head tie spans partitions 0 and 3: the head uses a per-call replica whose gradient joins
    the embedding's; after 3 Adam steps every weight equals the plain module's."""
    torch.manual_seed(0)
    layers = gpt2_layers(config("gpt2-tiny", vocab_size=96, n_embd=32, n_head=2, n_positions=16), dtype=torch.float64)
    plain = copy.deepcopy(nn.Sequential(*layers))
    model = GPipe(nn.Sequential(*layers), [2, 1, 1, 2], devices=CPU4, chunks=3, show_partition=False)
    assert model.partitions[3][1].lm_head.weight is model.partitions[0][0].wte.weight
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids, labels = torch.randint(0, 96, (7, 12), generator=g), torch.randint(0, 96, (7, 12), generator=g)
        labels[:, -3:] = -100  # padding, left out of the loss
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = lm_loss(model(ids), labels)
        loss.backward()
        ref_loss = lm_loss(plain(ids), labels)
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= TOL * ref_loss.item()
        assert grad_error(model, plain) <= TOL
        opt.step()
        ref_opt.step()
    ref = dict(plain.named_parameters())
    assert len(list(model.parameters())) == len(ref)
    assert max(rel(p, ref[name]) for name, p in model.named_parameters()) <= TOL


Pair = namedtuple("Pair", "h mask")


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"pair": Pair(self.lin(x), (x[:, 0] > 0).to(torch.float64)), "tag": "rides along",
                "ids": (x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()}


class Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, d: dict[str, Any]) -> dict[str, Any]:
        assert d["tag"] == "rides along" and d["ids"].dtype == torch.int64
        h, mask = d["pair"]
        return {**d, "pair": Pair(torch.tanh(self.lin(h)) + mask[:, None], mask)}


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, d: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.lin(d["pair"].h), d["ids"] * 2, d["tag"]


def test_tuple_dict_and_namedtuple_boundaries_with_values_riding_along():
    torch.manual_seed(0)
    plain = nn.Sequential(Split(), Mix(), Mix(), Head())
    model = GPipe(copy.deepcopy(plain), [1, 1, 1, 1], devices=CPU4, chunks=3, show_partition=False)
    x = torch.randn(8, 8)
    out, ids, tag = model(x)
    ref, ref_ids, ref_tag = plain(x)
    assert tag == ref_tag == "rides along" and torch.equal(ids, ref_ids) and not ids.requires_grad
    assert rel(out, ref) <= TOL
    out.square().sum().backward()
    ref.square().sum().backward()
    assert grad_error(model, plain) <= TOL


def dropout_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 16), nn.Dropout(0.3), nn.Tanh(),
                         nn.Linear(16, 16), nn.Dropout(0.3), nn.Linear(16, 4))


def test_dropout_masks_are_the_plain_modules_under_a_seed_per_partition_and_micro_batch():
    """In training mode every (partition, micro-batch) forward draws from its own seed, taken from torch's
    generator once per call: the plain module run with those seeds gives the same output and gradients, and a
    recomputed forward (checkpoint "always"/"except_last") replays the same masks."""
    plain = dropout_mlp()
    balance, chunks = [3, 3, 2, 1], 3
    x, y = torch.randn(7, 8), torch.randn(7, 4)
    # the reference: the plain module's layers, partition by partition, each seeded as GPipe seeds it
    torch.manual_seed(5)
    streams = RandomDraws(int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item()))
    outs, starts = [], [0, 3, 6, 8, 9]
    for n, xb in enumerate(x.split([3, 2, 2])):
        for s in range(len(balance)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(streams.seed_of(s, n))
                xb = plain[starts[s]:starts[s + 1]](xb)
        outs.append(xb)
    ref = torch.cat(outs)
    ((ref - y) ** 2).mean().backward()
    for mode in ("never", "except_last", "always"):
        model = GPipe(copy.deepcopy(dropout_mlp()), balance, devices=CPU4, chunks=chunks, checkpoint=mode,
                      show_partition=False)
        torch.manual_seed(5)
        out = model(x)
        ((out - y) ** 2).mean().backward()
        assert rel(out, ref) <= TOL, mode
        assert grad_error(model, plain) <= TOL, mode
    torch.manual_seed(6)
    assert rel(model(x), ref) > 1e-3  # another seed, other masks: dropout is really on


class CountCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.forwards, self.recomputes = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_recomputing():
            self.recomputes += 1
        else:
            self.forwards += 1
        return x * 1.5


@pytest.mark.parametrize("mode,recomputed", [("always", 4), ("except_last", 3), ("never", 0)])
def test_checkpoint_modes_recompute_as_torchgpipe_does(mode, recomputed):
    counters = [CountCalls() for _ in range(2)]
    layers = [counters[0], nn.Linear(4, 4), counters[1], nn.Linear(4, 4)]  # first: a recomputation may stop early
    model = GPipe(layers, [2, 2], devices=["cpu", "cpu"], chunks=4, checkpoint=mode, show_partition=False)
    model(torch.randn(8, 4)).sum().backward()
    assert [(c.forwards, c.recomputes) for c in counters] == [(4, recomputed)] * 2
    model.eval()
    model(torch.randn(8, 4))  # eval: forwards only, nothing kept to recompute
    assert [(c.forwards, c.recomputes) for c in counters] == [(8, recomputed)] * 2


def test_forward_only_under_no_grad_and_in_eval_mode():
    plain = mlp()
    model = GPipe(copy.deepcopy(plain), [2, 2, 2, 1], devices=CPU4, chunks=2, show_partition=False)
    x = torch.randn(6, 8, requires_grad=True)
    with torch.no_grad():
        out = model(x)
    assert not out.requires_grad and out.grad_fn is None and rel(out, plain(x)) <= TOL
    model.eval()
    assert not model.partitions[0].training and not model.partitions[0][0].training
    out = model(x)
    assert not out.requires_grad and out.grad_fn is None and rel(out, plain(x)) <= TOL
    assert {e.op for e in model.last_trace().events} == {"F"}
    model.train()
    assert model(x).requires_grad


def test_each_partition_runs_on_its_own_worker_thread_in_the_schedules_order():
    model = GPipe(mlp(), [2, 2, 2, 1], devices=CPU4, chunks=3, show_partition=False)
    model(torch.randn(9, 8)).sum().backward()
    events = model.last_trace().events
    main = threading.current_thread().name
    schedule = validate(build("gpipe", 4, 3))
    for d in range(4):
        mine = [e for e in events if e.device == d]
        assert {e.extra["thread"] for e in mine} == {f"stagewise-gpipe-{d}"} != {main}
        assert [(e.op, e.stage, e.microbatch) for e in mine] == [
            (a.op, a.stage, a.microbatch) for a in schedule.compute_actions(d) if a.op in ("F", "B")]


class _Meet(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, barrier: threading.Barrier, wait: bool) -> torch.Tensor:
        ctx.barrier, ctx.wait = barrier, wait
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        if ctx.wait:
            ctx.barrier.wait(30)
        return g, None, None


class Meet(nn.Module):
    """Waits at a barrier in the forward of micro-batch `forward_at` and the backward of micro-batch
    `backward_at`: another partition must be at the same barrier at the same time, or it breaks."""

    def __init__(self, forward_barrier: threading.Barrier, backward_barrier: threading.Barrier, forward_at: int,
                 backward_at: int):
        super().__init__()
        self.fb, self.bb, self.forward_at, self.backward_at = forward_barrier, backward_barrier, forward_at, backward_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.calls
        self.calls += 1
        if n == self.forward_at:
            self.fb.wait(30)
        return _Meet.apply(x, self.bb, n == self.backward_at)


def test_devices_really_work_at_the_same_time_in_forward_and_backward():
    """GPipe's order puts F(0, mb 1) beside F(1, mb 0) and B(0, mb 0) beside B(1, mb 1); layers there meet at
    barriers, which only pass when both workers are inside at once (run one after the other, they break)."""
    fb, bb = threading.Barrier(2), threading.Barrier(2)
    layers = [nn.Linear(4, 4), Meet(fb, bb, forward_at=1, backward_at=0), nn.Linear(4, 4),
              Meet(fb, bb, forward_at=0, backward_at=1)]
    model = GPipe(layers, [2, 2], devices=["cpu", "cpu"], chunks=2, checkpoint="never", show_partition=False)
    model(torch.randn(4, 4)).sum().backward()
    assert not fb.broken and not bb.broken
    assert all(p.grad is not None for p in model.parameters())


def bn_layers(momentum: float | None) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.BatchNorm1d(6, momentum=momentum), nn.Linear(6, 8), nn.Tanh(), nn.BatchNorm1d(8, momentum=momentum),
            nn.Linear(8, 3)]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_deferred_batch_norm_tracks_the_whole_mini_batch(momentum):
    """Running statistics equal full-batch BatchNorm's on the same inputs (the first layer sees the batch
    itself; later ones are checked on the inputs they received), tracked once per call even with recomputation;
    each micro-batch is normalised with its own statistics."""
    plain = nn.Sequential(*bn_layers(momentum))
    model = GPipe(bn_layers(momentum), [2, 3], devices=["cpu", "cpu"], chunks=4, checkpoint="always",
                  deferred_batch_norm=True, show_partition=False)
    deferred = [m for m in model.modules() if isinstance(m, DeferredBatchNorm)]
    assert len(deferred) == 2 and list(model.state_dict()) == list(plain.state_dict())
    seen: list[torch.Tensor] = []
    normalised: list[tuple[torch.Tensor, torch.Tensor]] = []

    def inputs_of_second(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not is_recomputing():
            seen.append(args[0].detach())

    def first_in_out(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not is_recomputing():
            normalised.append((args[0].detach(), out.detach()))

    deferred[1].register_forward_hook(inputs_of_second)
    deferred[0].register_forward_hook(first_in_out)
    second = nn.BatchNorm1d(8, momentum=momentum)
    second.load_state_dict(deferred[1].state_dict())
    for step in range(3):
        x = torch.randn(10, 6) * 2 + 1
        seen.clear()
        model(x).sum().backward()
        plain(x)
        assert len(seen) == 4  # once per micro-batch: the recomputations were not tracked
        second(torch.cat(seen))
        assert int(deferred[0].num_batches_tracked) == step + 1
        for got, want in ((deferred[0], plain[0]), (deferred[1], second)):
            assert rel(got.running_mean, want.running_mean) <= TOL
            assert rel(got.running_var, want.running_var) <= TOL
    # each micro-batch was normalised by its own statistics
    assert len(normalised) == 12 and [len(x) for x, _ in normalised[:4]] == [3, 3, 2, 2]
    for x, out in normalised:
        want = nn.functional.batch_norm(x, None, None, deferred[0].weight, deferred[0].bias, True)
        assert rel(out, want) <= TOL
    x = torch.randn(8, 6)
    model.eval()
    plain.eval()
    plain.load_state_dict(model.state_dict())
    assert rel(model(x), plain(x)) <= TOL  # eval mode: the running statistics


@pytest.mark.parametrize("balance,expect", [
    ([2, 2, 2], r"covers 6 layers but the module has 7: layers 6 to 6 are in no partition.*last one would hold 3"),
    ([2, 2, 4], r"covers 8 layers but the module has 7: partition 2 would hold layers up to 7"),
    ([2, 0, 5], r"partition 1 has 0 layers"),
])
def test_a_balance_that_does_not_cut_the_module_names_the_partition(balance, expect):
    with pytest.raises(PartitionError, match=expect):
        GPipe(mlp(), balance, devices=["cpu"] * 3, show_partition=False)


def test_clear_errors_for_devices_batches_and_options():
    with pytest.raises(ValueError, match=r"3 partitions but only 2 devices .* partition 2 has no device.*'cpu'\] \* 3"):
        GPipe(mlp(), [3, 2, 2], devices=["cpu", "cpu"], show_partition=False)
    if torch.cuda.device_count() < 4:
        with pytest.raises(ValueError, match=r"partition 2 is placed on cuda:3, but (torch sees no GPU|only \d GPUs)"):
            GPipe(mlp(), [3, 2, 2], devices=["cpu", "cpu", "cuda:3"], show_partition=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no devices given and no GPU is visible; pass devices=\['cpu'\] \* 3"):
            GPipe(mlp(), [3, 2, 2], show_partition=False)
    model = GPipe(mlp(), [3, 2, 2], devices=["cpu"] * 3, chunks=4, show_partition=False)
    with pytest.raises(ValueError, match=r"chunks=4\) got a batch of 3 samples.*at least 4 samples.*chunks <= 3"):
        model(torch.randn(3, 8))
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        GPipe(mlp(), [3, 2, 2], devices=["cpu"] * 3, checkpoint="sometimes", show_partition=False)
    with pytest.raises(ValueError, match="balance='time' measures every layer: pass sample="):
        GPipe(mlp(), "time", devices=["cpu"] * 3, show_partition=False)
    with pytest.raises(TypeError, match="cannot be moved with .to"):
        model.to("cpu")


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return x


def test_a_failing_partition_is_named_and_the_model_stays_usable():
    model = GPipe([nn.Linear(4, 4), nn.Tanh(), Boom(), nn.Linear(4, 2)], [1, 1, 2], devices=["cpu"] * 3, chunks=3,
                  show_partition=False)
    with pytest.raises(PipelineError, match=r"partition 2 \(device cpu\) failed at F\(stage 2, mb 1\): "
                                            r"RuntimeError: boom") as info:
        model(torch.randn(6, 4))
    assert (info.value.stage, info.value.microbatch) == (2, 1)
    out = model(torch.randn(6, 4))
    out.sum().backward()
    out = model(torch.randn(6, 4))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per call"):
        out.sum().backward()


def test_partition_methods_and_the_partition_table(capsys):
    model = GPipe(mlp(), "parameters", devices=["cpu"] * 2)
    printed = capsys.readouterr().out
    assert model.balance == model.partition_table().balance and sum(model.balance) == 7
    assert "stage 0" in printed and "stage 1" in printed and "params" in printed
    by_type = GPipe(mlp(), "type:Linear", devices=["cpu"] * 4, show_partition=False)
    assert by_type.balance == [2, 2, 2, 1]  # a Linear per partition, each activation rides with the Linear before
    timed = GPipe(mlp(), "time", devices=["cpu"] * 2, chunks=2, sample=torch.randn(8, 8), show_partition=False)
    assert sum(timed.balance) == 7 and timed.partition_table().stages[0].time is not None


def test_the_plain_modules_state_dict_and_names():
    plain = mlp()
    model = GPipe(copy.deepcopy(plain), [2, 2, 2, 1], devices=CPU4, show_partition=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(0.5)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8)
    assert rel(model(x), plain(x)) <= TOL
    assert isinstance(stagewise.GPipe, type) and len(model.partitions) == 4
    model(x).sum().backward()
    twin = copy.deepcopy(model)  # its own workers; the same weights, the partitions still on their devices
    assert twin.partitions[2][0] is twin.get_submodule("4") and rel(twin(x), plain(x)) <= TOL


def test_the_example_runs(tmp_path):
    text = "\n".join((ROOT / "stagewise" / name).read_text() for name in ("gpipe.py", "tree.py", "pipeline.py"))
    (tmp_path / "data.txt").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STAGEWISE_CACHE": str(tmp_path / "cache")}
    script = str(ROOT / "examples" / "gpipe_gpt2.py")
    run = subprocess.run([sys.executable, script, "--data", str(tmp_path / "data.txt"), "--vocab-size", "300",
                          "--seq-len", "32", "--steps", "3", "--log-every", "1", "--compare-plain"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "stage 3" in out and "GPipe:" in out and "plain module:" in out
    losses = [line.split("loss: ")[1] for line in out.splitlines() if "step: 2, loss" in line]
    assert len(losses) == 2 and losses[0] == losses[1]  # GPipe and the plain module agree


class BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bad gradient")


class FailsBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BadGrad.apply(x)


def test_a_failing_backward_is_named_and_autocast_reaches_the_workers():
    model = GPipe([nn.Linear(4, 4), FailsBackward(), nn.Linear(4, 2)], [2, 1], devices=["cpu"] * 2, chunks=2,
                  show_partition=False)
    with pytest.raises(PipelineError, match=r"partition 0 \(device cpu\) failed at B\(stage 0, mb 0\): "
                                            r"RuntimeError: bad gradient"):
        model(torch.randn(4, 4)).sum().backward()
    plain = mlp().float()
    model = GPipe(copy.deepcopy(plain), [3, 4], devices=["cpu"] * 2, chunks=2, show_partition=False)
    x = torch.randn(4, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16 and rel(out.float(), ref.float()) <= 2e-2
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


class Flat(nn.Module):
    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y.flatten(0, 1), y.sum(-1)  # (B*T, D) and (B, T): the slots split differently


def test_output_tensors_with_their_own_first_dimension():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), Flat())
    model = GPipe(copy.deepcopy(plain), [2, 2], devices=["cpu"] * 2, chunks=3, show_partition=False)
    x = torch.randn(5, 7, 4)
    (flat, summed), (ref_flat, ref_summed) = model(x), plain(x)
    assert flat.shape == (35, 6) and rel(flat, ref_flat) <= TOL and rel(summed, ref_summed) <= TOL
    (flat.square().sum() + summed.sin().sum()).backward()
    (ref_flat.square().sum() + ref_summed.sin().sum()).backward()
    assert grad_error(model, plain) <= TOL


# ---- GPipe on the one executor: races, reproducibility, guards, the world's threads ----

def tied_mlp() -> nn.Sequential:
    """Layers 0 and 4 share their weight: partitions 0 and 2 of balance [2, 2, 2, 1] hold it both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 4))
    model[4].weight = model[0].weight
    return model


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_exact_every_time_under_short_thread_switches(checkpoint):
    """20 calls per mode and chunks 1, 3, 5, with a parameter shared by partitions 0 and 2, the interpreter
    switching threads every 10 us: output, every gradient and the input's gradient equal the plain module's."""
    plain = tied_mlp()
    x, y = torch.randn(10, 8), torch.randn(10, 4)
    xr = x.clone().requires_grad_()
    ref = plain(xr)
    ((ref - y) ** 2).mean().backward()
    for chunks in (1, 3, 5):
        model = GPipe(copy.deepcopy(plain), [2, 2, 2, 1], devices=CPU4, chunks=chunks, checkpoint=checkpoint,
                      show_partition=False)
        assert model.partitions[2][0].weight is model.partitions[0][0].weight
        with short_switches():
            for _ in range(20):
                model.zero_grad()
                xg = x.clone().requires_grad_()
                out = model(xg)
                ((out - y) ** 2).mean().backward()
                assert rel(out, ref) <= TOL and rel(xg.grad, xr.grad) <= TOL
                assert grad_error(model, plain) <= TOL, (chunks, grad_error(model, plain))


def test_a_run_is_reproducible_under_a_seed_whatever_the_thread_timing():
    """Dropout on every partition, the forwards of two partitions drawing at once: the same seed gives the same
    bits, call after call, under short thread switches."""
    model = GPipe(dropout_mlp(), [3, 3, 2, 1], devices=CPU4, chunks=4, checkpoint="except_last",
                  show_partition=False)
    x = torch.randn(8, 8)
    runs = []
    with short_switches():
        for _ in range(5):
            model.zero_grad()
            torch.manual_seed(9)
            out = model(x)
            out.square().sum().backward()
            runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


class ReturnsNone(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        x.sum()


def test_gpipe_gains_the_executors_guards():
    """A partition returning None is named with the layer that returned it, before the next one fails on it."""
    model = GPipe([nn.Linear(4, 4), ReturnsNone(), nn.Linear(4, 2)], [2, 1], devices=["cpu"] * 2, chunks=2,
                  show_partition=False)
    with pytest.raises(PipelineError, match=r"partition 0 \(device cpu\) returned None at F\(stage 0, mb 0\): its "
                                            r"last layer, layer 1 \(ReturnsNone\), returned None") as info:
        model(torch.randn(4, 4))
    assert (info.value.stage, info.value.microbatch) == (0, 0)


def test_the_worker_threads_live_across_calls_and_end_with_a_failure():
    model = GPipe(mlp(), [4, 3], devices=["cpu"] * 2, chunks=2, show_partition=False)
    before = set(threading.enumerate())

    def workers() -> set[threading.Thread]:
        return {t for t in set(threading.enumerate()) - before if t.name.startswith("stagewise-gpipe")}

    model(torch.randn(4, 8)).sum().backward()
    first = workers()
    model(torch.randn(4, 8)).sum().backward()
    assert first == workers() and len(first) == 2  # the same two threads ran both calls
    with pytest.raises(PipelineError, match=r"partition 0 \(device cpu\) failed at F\(stage 0, mb 0\)"):
        model(torch.randn(4, 3))  # a shape error in partition 0: the world fails, its workers end
    assert not any(t.is_alive() for t in first)
    model(torch.randn(4, 8)).sum().backward()  # and the next call gets new ones
    assert len(workers() - first) == 2


def test_recompute_microbatches_puts_a_recompute_before_each_chosen_backward():
    sc = validate(recompute_microbatches(validate(build("gpipe", 2, 4)), range(3)))
    for prog in sc.programs:
        compute = [(a.op, a.microbatch) for a in prog if a.op in ("F", "B", RECOMPUTE)]
        assert compute == [("F", n) for n in range(4)] + [x for n in range(4) for x in
                                                          ([(RECOMPUTE, n)] if n < 3 else []) + [("B", n)]]


def test_the_local_transport_hands_tensors_over_without_a_copy_on_one_device():
    hub = LocalHub()
    sender, receiver = (LocalTransport(hub, 5.0, r, [0, 1], [torch.device("cpu"), torch.device("meta")])
                        for r in (0, 1))
    t = torch.randn(3, 2, requires_grad=True)
    receiver.send_grad([t], 1, 0, 0, peer=0)  # to the CPU: the same memory
    got = sender.recv_grad([t], 1, 0, 0, peer=1).wait()[0]
    assert got.data_ptr() == t.data_ptr() and not got.requires_grad
    sender.send_activation({"h": t}, 0, 1, 0, peer=1)  # to another device: a copy there
    moved = receiver.recv_activation(0, 1, 0, peer=0).wait()["h"]
    assert moved.device.type == "meta" and moved.shape == t.shape and moved.requires_grad
