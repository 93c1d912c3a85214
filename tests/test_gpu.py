"""The GPU path: stages as threads on one CUDA device, each on its own stream, exact against one process.

Marked `gpu` and skipped without CUDA (CI has none): `benchmarks/gpu_check.sh` runs them on a GPU machine
(`PYTHONPATH=. python3 -m pytest -q -m gpu tests/test_gpu.py`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toy import loss_fn, make_batch, make_layers, make_padded_batch, token_loss

from stagewise import GPipe, Pipeline
from stagewise.runtime.loss import mean_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls in full fp32 (TF32 rounds to 10 bits: the parity tolerance would mean nothing)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _parity(schedule: str, P: int, m: int, dtype: torch.dtype, loss=loss_fn, batch=None, steps: int = 3,
            **options) -> float:
    """Worst relative error of the losses and weights after `steps` Adam steps, pipeline on cuda:0 vs one
    process on cuda:0."""
    dev = torch.device("cuda", 0)
    layers = [m_.to(dev, dtype) for m_ in make_layers(blocks=7)]
    batch = batch or make_batch(12, 5)
    batch = tuple(t.to(dev) for t in batch)
    reference = nn.Sequential(*copy.deepcopy(layers))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    want = []
    for _ in range(steps):
        opt.zero_grad()
        value = mean_of(loss(reference(batch[0]), batch[1]))
        value.backward()
        want.append(value.item())
        opt.step()
    pipe = Pipeline(copy.deepcopy(layers), loss, schedule=schedule, microbatches=m, local_devices=P, device=dev,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2), show_partition=False, timeout=120, **options)
    try:
        got = [pipe.train_step(batch).item() for _ in range(steps)]
        ref = dict(reference.named_parameters())
        errs = [((p - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item()
                for n, p in pipe.named_parameters()]
        assert all(p.device == dev for _, p in pipe.named_parameters())
    finally:
        pipe.close()
    return max(errs + [abs(a - b) / abs(b) for a, b in zip(got, want)])


@pytest.mark.parametrize("schedule,P,m", [("1f1b", 2, 4), ("zbv", 2, 4), ("interleaved", 2, 4), ("dualpipev", 2, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_threads_on_one_gpu_each_on_its_stream_equal_one_process(schedule, P, m, dtype, tol):
    assert _parity(schedule, P, m, dtype) <= tol


def test_token_mean_and_recompute_on_gpu():
    err = _parity("zbv", 2, 4, torch.float64, loss=token_loss, batch=make_padded_batch(12, 6),
                  recompute="always")
    assert err <= 1e-10


def test_bf16_autocast_trains_close_to_fp32_on_gpu():
    """bf16 is not exact (7-bit mantissa): the losses of 3 steps stay within 2% of fp32's."""
    dev = torch.device("cuda", 0)
    batch = tuple(t.to(dev) for t in make_batch(12, 5))
    losses = {}
    for precision in ("fp32", "bf16"):
        pipe = Pipeline([m_.float() for m_ in make_layers()], loss_fn, schedule="1f1b", microbatches=4,
                        local_devices=2, device=dev, precision=precision, show_partition=False,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
        losses[precision] = [pipe.train_step(batch).item() for _ in range(3)]
        pipe.close()
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert abs(a - b) <= 0.02 * abs(b), losses


def test_gpipe_on_two_partitions_of_one_gpu_equals_one_module():
    dev = torch.device("cuda", 0)
    layers = [m_.to(dev) for m_ in make_layers(blocks=3)]
    reference = nn.Sequential(*copy.deepcopy(layers))
    ids, labels = (t.to(dev) for t in make_batch(8, 5))
    loss_fn(reference(ids), labels).backward()
    model = GPipe(nn.Sequential(*layers), balance=[2, 3], devices=["cuda:0", "cuda:0"], chunks=4)
    loss_fn(model(ids), labels).backward()
    ref = dict(reference.named_parameters())  # GPipe names its parameters as the nn.Sequential does
    for n, p in model.named_parameters():
        assert ((p.grad - ref[n].grad).abs().max() <= 1e-10 * ref[n].grad.abs().max()).item(), n


@pytest.mark.parametrize("devices", [["cpu", "cuda:0", "cpu"], ["cuda:0", "cpu", "cuda:0"]])
def test_gpipe_across_the_host_and_a_gpu_equals_one_module(devices):
    """Partitions alternate between the CPU and the GPU: the transport copies every activation (a dict with an
    integer tensor riding along) and gradient to the receiver's device; with recomputation, the output's loss
    and every gradient equal one module's on the CPU."""
    layers = make_layers(blocks=4)
    reference = nn.Sequential(*copy.deepcopy(layers))
    ids, labels = make_batch(8, 5)
    model = GPipe(nn.Sequential(*layers), balance=[2, 2, 2], devices=devices, chunks=4, checkpoint="always",
                  show_partition=False)
    for part, dev in zip(model.partitions, model.devices):
        assert all(p.device == dev for p in part.parameters())
    out = model(ids.to(model.devices[0]))
    assert out.device == model.devices[-1]
    loss = loss_fn(out.cpu(), labels)
    loss.backward()
    ref_loss = loss_fn(reference(ids), labels)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert ((p.grad.cpu() - ref[n].grad).abs().max() <= 1e-10 * ref[n].grad.abs().max()).item(), n


def test_a_checkpoint_saved_from_gpu_loads_on_cpu_and_back(tmp_path):
    dev = torch.device("cuda", 0)
    batch = tuple(t.to(dev) for t in make_batch(8, 5))
    pipe = Pipeline(make_layers(), loss_fn, local_devices=2, device=dev, show_partition=False,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    pipe.train_step(batch)
    pipe.save_checkpoint(tmp_path / "ckpt")
    saved = {n: p.detach().cpu().clone() for n, p in pipe.named_parameters()}
    pipe.close()
    on_cpu = Pipeline(make_layers(seed=5), loss_fn, local_devices=2, show_partition=False,
                      optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    on_cpu.load_checkpoint(tmp_path / "ckpt")
    for n, p in on_cpu.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n
    on_cpu.train_step(tuple(t.cpu() for t in batch))
    on_cpu.save_checkpoint(tmp_path / "back")
    stepped = {n: p.detach().clone() for n, p in on_cpu.named_parameters()}
    on_cpu.close()
    again = Pipeline(make_layers(seed=6), loss_fn, local_devices=2, device=dev, show_partition=False,
                     optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    again.load_checkpoint(tmp_path / "back")
    for n, p in again.named_parameters():
        assert p.device == dev and torch.equal(p.detach().cpu(), stepped[n]), n
    again.train_step(batch)  # the optimizer state came back too: a step runs on it
    again.close()


def test_the_measured_timeline_on_gpu_is_timed_by_cuda_events():
    """Action times come from CUDA events: every compute action lasts > 0 and events of one device do not
    overlap (one stream per rank runs its kernels in order)."""
    dev = torch.device("cuda", 0)
    pipe = Pipeline(make_layers(), loss_fn, schedule="1f1b", microbatches=4, local_devices=2, device=dev,
                    show_partition=False, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    pipe.train_step(tuple(t.to(dev) for t in make_batch(12, 5)))
    trace = pipe.last_trace()
    pipe.close()
    compute = [e for e in trace.events if e.op in ("F", "B")]
    assert compute and all(e.end > e.start for e in compute)
    for d in range(2):
        mine = sorted((e for e in compute if e.device == d), key=lambda e: e.start)
        assert all(a.end <= b.start + 1e-6 for a, b in zip(mine, mine[1:]))
