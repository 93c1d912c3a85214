"""The fault campaign as a suite: faults and bad inputs against the API, the CLI and the launchers (the in-process
cases here; the command line, processes and launchers in tests/test_faults_processes.py; what every case checks in
tests/fault_checks.py).

Every case asserts that every process and thread ends within a bound, that the message names what it
should (the stage, micro-batch, action, option, rank or file), that no process is left behind (every
process a case starts carries a tag in its environment; /proc is searched for it afterwards) and that
nothing is written half (no run folder for a refused command, no temporary or partial checkpoint).

`pytest -q` (CI, `make test`) runs a reduced form: the in-process cases (threads, the CLI's parser) and five
that start processes (ranks given different data, a NaN across ranks, a rank that leaves during a collective,
a rank killed under `stagewise run`, a refused `stagewise train`), about 55 s on 2 busy cores.
`STAGEWISE_FAULTS=full pytest -q -m faults` runs all of it (a few minutes: every multi-process case starts 2
or 3 Python processes).
"""

from __future__ import annotations

import re
import threading
import warnings

import pytest
import torch
from fault_checks import nothing_left_behind, pipe, raises, within  # noqa: F401 (nothing_left_behind: an autouse fixture)
from fault_workers import (
    Counted,
    InfLoss,
    UseMask,
    WithMask,
    batch,
    layers,
    mse,
    random_layers,
)

from stagewise import Pipeline, PipelineError

pytestmark = pytest.mark.faults


# ---- non-finite values (threads) -------------------------------------------------------------------------

def test_nan_in_a_middle_stage_names_the_stage_and_microbatch():
    p = pipe(Counted(2, "nan"), partition=[3, 2, 2], devices=3)
    raises(r"first appeared in stage 1's output for micro-batch 2 \(rank 1, F\(stage 1, mb 2\)\).*not taken on "
           r"any rank.*on_nonfinite='skip'", p.train_step, batch(8), kind=PipelineError)
    raises("stopped after an earlier failure", p.train_step, batch(8))


def test_inf_in_the_first_stage_names_stage_0():
    p = pipe(Counted(1, "inf"), partition=[6, 1], at=5)  # an inf that no tanh absorbs: the loss is inf
    raises(r"stage 0's output for micro-batch 1", p.train_step, batch(8), kind=PipelineError)


def test_an_inf_loss_names_the_loss_and_its_microbatch():
    p = pipe(partition=[3, 3], loss_fn=InfLoss(3))
    raises(r"the loss of micro-batch 3 \(last stage 1, rank 1\).*check loss_fn", p.train_step, batch(8))


def test_nan_made_by_a_layer_of_the_last_stage_blames_that_layer_not_the_loss():
    p = pipe(Counted(2, "nan"), partition=[3, 4])  # the fault is the first layer of the last stage
    text = raises(r"first appeared in stage 1's output for micro-batch 2 \(rank 1, F\(stage 1, mb 2\)\): the output of "
                  r"the last stage's layers, before loss_fn saw it", p.train_step, batch(8), kind=PipelineError)
    assert "check loss_fn" not in text
    # a finite output and a non-finite loss still blame the loss, saying that the output was finite
    raises(r"the loss of micro-batch 1 .*the last stage's own output included, was finite: check loss_fn",
           pipe(partition=[3, 3], loss_fn=InfLoss(1)).train_step, batch(8))


def test_a_nan_gradient_names_the_backward_stage_and_microbatch():
    p = pipe(Counted(1, "nan-grad"), partition=[3, 2, 2], devices=3)
    raises(r"backward of stage 1 \(rank 1\): the gradient of its input for micro-batch 1", p.train_step, batch(8))


def test_a_nan_parameter_gradient_names_the_stage():
    p = pipe(Counted(0, "nan-weight-grad"), partition=[3, 2, 2], devices=3)
    raises(r"backward of stage 1 \(rank 1\): its parameter gradients", p.train_step, batch(8))


def test_skip_policy_skips_the_step_everywhere_and_trains_on():
    p = pipe(Counted(2, "nan"), on_nonfinite="skip", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = [w.detach().clone() for w in p.parameters()]
    warned = r"step skipped on every rank: .*stage 0's output for micro-batch 2"
    with within(15), pytest.warns(UserWarning, match=warned):
        loss = p.train_step(batch(8))
    assert not torch.isfinite(loss) and "stage 0's output" in p.last_step["skipped"]
    assert all(torch.equal(a, w.detach()) for a, w in zip(before, p.parameters()))  # no weight moved anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(p.train_step(batch(8)))  # the fault was once: training goes on
    assert not p.last_step["skipped"] and not all(torch.equal(a, w.detach()) for a, w in zip(before, p.parameters()))


def test_skip_policy_with_data_parallel_replicas_keeps_them_equal():
    p = pipe(Counted(1, "nan"), on_nonfinite="skip", data_parallel=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
             microbatches=2)
    with within(15), pytest.warns(UserWarning, match="step skipped"):
        p.train_step(batch(8))
    replicas = [[w for st in p.model.of_rank(r).values() for w in st.parameters()] for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*replicas))


def test_raise_policy_wins_over_clipping_skip():
    p = pipe(Counted(2, "nan"), max_grad_norm=1.0)
    raises(r"stage 0's output for micro-batch 2", p.train_step, batch(8))


def test_nan_in_an_accumulating_call_is_named_at_the_step():
    p = pipe(Counted(5, "nan"))  # call 5: micro-batch 1 of the second call
    p.train_step(batch(8), step=False)
    p.train_step(batch(8), step=False)
    raises(r"stage 0's output for micro-batch 1", p.train_step, batch(8))


def test_nan_under_an_asynchronous_schedule_raises():
    p = pipe(Counted(2, "nan"), schedule="pipedream", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    # each rank decides alone here: the first to stop names what it saw (its own stage's output: the last stage
    # sees the NaN stage 0 sent it come out of its own layers)
    raises(r"non-finite .*(stage 0's output for micro-batch 2|stage 1's output for micro-batch 2)", p.train,
           iter([batch(8)] * 2), 2)


def test_eval_returns_a_nan_loss_without_stopping():
    p = pipe(Counted(1, "nan"))
    with within(15):
        assert not torch.isfinite(p.eval_step(batch(8))["loss"])
    assert torch.isfinite(p.train_step(batch(8)))  # nothing was kept from the evaluation


def test_eval_step_runs_in_eval_mode_restores_every_mode_and_joins_the_outputs():
    from stagewise.tree import concat

    net = layers()
    net.insert(3, torch.nn.Dropout(0.9))
    reference = torch.nn.Sequential(*net)
    p = Pipeline([*net], mse, partition=[4, 3], local_devices=2, microbatches=4, show_partition=False, timeout=5)
    modules = [m for st in p.stages.values() for m in st.module.modules()]
    modules[-1].eval()  # a module the user put in eval mode stays so
    before = [m.training for m in modules]
    x, y = batch(8)
    with within(15):
        out = p.eval_step((x, y))
    assert [m.training for m in modules] == before and before[0]  # every mode back as it was
    assert isinstance(out["outputs"], torch.Tensor) and out["outputs"].shape == (8, 1)  # joined, as one forward
    with torch.no_grad():
        want = reference.eval()(x)  # dropout off: what one forward of the batch in eval mode gives
    assert torch.allclose(out["outputs"], want, atol=1e-6) and torch.allclose(out["loss"].float(), mse(want, y))
    # the modes come back even when the evaluation raises
    bad = Pipeline(layers(Counted(0, "raise")), mse, partition=[4, 3], local_devices=2, microbatches=2,
                   show_partition=False, timeout=5)
    raises(r"boom", bad.eval_step, batch(8), kind=PipelineError)
    assert all(m.training for st in bad.stages.values() for m in st.module.modules())
    # the tree join: tensors along dim 0, 0-dim ones stacked, other values from the first micro-batch
    a = {"h": torch.ones(2, 3), "aux": torch.tensor(1.0), "tag": "first"}
    b = {"h": torch.zeros(1, 3), "aux": torch.tensor(2.0), "tag": "second"}
    joined = concat([a, b])
    assert joined["h"].shape == (3, 3) and joined["aux"].tolist() == [1.0, 2.0] and joined["tag"] == "first"
    with pytest.raises(ValueError, match="cannot join the outputs of the micro-batches: number 1"):
        concat([a, {**b, "h": torch.zeros(1, 4)}])


def test_an_inf_mask_without_gradient_is_not_a_fault():
    layers_ = [torch.nn.Linear(4, 4), WithMask(), UseMask(), torch.nn.Linear(4, 1)]
    p = Pipeline(layers_, mse, partition=[2, 2], local_devices=2, microbatches=2, show_partition=False, timeout=5)
    with within(15):
        assert torch.isfinite(p.train_step(batch(8)))


# ---- no gradient path: the step would train nothing (threads) ---------------------------------------------

class ToInt(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.round().long()


class Detach(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def as_float_mse(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return mse(out.float(), labels)


@pytest.mark.parametrize("last,pattern", [
    (ToInt(), r"stage 1's output, \[4, 1\]:int64 from layer 6 \(ToInt\), carries no gradient although its input "
              r"does: a layer of stage 1 \(layers 3-6\) cuts the gradient path"),
    (Detach(), r"stage 1's output, \[4, 1\]:float32 from layer 6 \(Detach\), carries no gradient.*\.detach\(\)"),
])
def test_an_output_without_gradient_path_is_refused_naming_the_stage_and_layer(last, pattern):
    """Plain PyTorch's loss.backward() raises here; the pipeline must not train nothing with a constant loss."""
    p = pipe(last, partition=[3, 4], at=6, loss_fn=as_float_mse, microbatches=2)  # the model's last layer, 6
    raises(r"stage 1 \(rank 1\) at F\(stage 1, mb 0\): the loss of micro-batch 0 does not require grad, so no "
           r"parameter would get a gradient.*element 0 of tensors does not require grad.*" + pattern, p.train_step,
           batch(8), kind=PipelineError)


def test_a_loss_fn_that_cuts_the_graph_and_a_frozen_model_are_refused():
    p = pipe(loss_fn=lambda out, y: mse(out, y).detach(), microbatches=2)
    raises(r"stage 1's output carries a gradient but loss_fn's result does not, so loss_fn cut the graph",
           p.train_step, batch(8), kind=PipelineError)
    frozen = layers()
    for w in (w for layer in frozen for w in layer.parameters()):
        w.requires_grad_(False)
    for devices, pattern in [(1, r"no parameter of the model requires grad \(every one is frozen.*use eval_step"),
                             (2, r"stage 1 \(layers 3-5\) got no input that requires grad from stage 0 and holds no "
                                 r"parameter that does.*or every parameter of the model is frozen")]:
        p = Pipeline(frozen, mse, partition=[6] if devices == 1 else [3, 3], local_devices=devices, microbatches=2,
                     show_partition=False, timeout=5)
        assert torch.isfinite(p.eval_step(batch(8))["loss"])  # evaluating a frozen model is fine
        raises(pattern, p.train_step, batch(8), kind=PipelineError)


def test_a_loss_without_gradient_is_fine_for_a_pair_that_counts_nothing():
    """A (sum, count) loss may return a constant for a micro-batch with nothing to count: no gradient is right."""
    def pair(out: torch.Tensor, y: torch.Tensor):
        return (torch.zeros(()), 0) if bool((y > 100).all()) else ((out - y).pow(2).sum(), y.numel())

    x, y = batch(8)
    y[:4] = 1000.0  # micro-batch 0 counts nothing
    p = pipe(loss_fn=pair, microbatches=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01))
    before = [w.detach().clone() for w in p.parameters()]
    with within(15):
        assert torch.isfinite(p.train_step((x, y)))
    assert not all(torch.equal(a, w.detach()) for a, w in zip(before, p.parameters()))


# ---- every rank the same batch: the checksum -------------------------------------------------------------

def test_the_batch_checksum_sees_every_element_on_any_device_path():
    from stagewise.runtime.guards import _COLUMNS, _device_sum, _host_sum, checksum, fingerprint

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (16, 128), generator=g)
    x = torch.randn(3, 1000, 7, generator=g)  # 21000 floats: 10500 words, 10 rows of 1024 and a tail
    for t in (ids, x, x.to(torch.float16), x[:, :, 1:], x.transpose(0, 2), torch.randn(5, 3)[1:, 1:]):
        base = checksum(t)
        for i in torch.randint(0, t.numel(), (40,), generator=g).tolist() + [0, t.numel() - 1]:
            changed = t.contiguous().clone()  # the same elements in the same (row-major) order as t
            flat = changed.view(-1)
            if t.is_floating_point():
                flat[i] = torch.nextafter(flat[i], torch.tensor(1e4, dtype=t.dtype))  # one bit
            else:
                flat[i] += 1
            assert checksum(changed) != base, (t.shape, i)
        assert checksum(t.clone()) == base and checksum(t.contiguous()) == base
    swapped = ids.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same samples in another order
    assert checksum(swapped) != checksum(ids)
    assert checksum(torch.tensor([0.0])) != checksum(torch.tensor([-0.0]))  # bytes, not values
    # the CPU (numpy) and device (torch) sums are the same number
    for rows in (1, 3, 4097):
        body = torch.randint(-2**62, 2**62, (rows, _COLUMNS), generator=g)
        assert _host_sum(body) % 2**64 == _device_sum(body) % 2**64
    a, b = ids.clone(), ids.clone()
    b[7, 77] += 1
    assert fingerprint((a, ids), "train_step", "")["inputs checksum"] != \
        fingerprint((b, ids), "train_step", "")["inputs checksum"]


# ---- options refused at construction ---------------------------------------------------------------------

def _factories(built: list) -> list:
    def make(i: int):
        def build():
            built.append(i)
            return torch.nn.Linear(4, 4) if i < 2 else torch.nn.Linear(4, 1)
        return build
    return [make(i) for i in range(3)]


@pytest.mark.parametrize("option,pattern", [
    ({"timeout": 0}, r"timeout must be a positive, finite number of seconds.*got 0"),
    ({"timeout": -1}, r"timeout must be .*got -1"),
    ({"timeout": float("nan")}, r"timeout must be .*got nan"),
    ({"timeout": float("inf")}, r"timeout must be .*got inf"),
    ({"timeout": "30"}, r"timeout must be .*got '30'"),
    ({"on_nonfinite": "ignore"}, r"on_nonfinite must be one of 'raise', 'skip', got 'ignore'"),
    ({"schedule": "fast"}, r"unknown schedule 'fast'"),
    ({"microbatches": 0}, r"micro-batches must be an integer >= 1, got 0"),
    ({"partition": [2, 2]}, r"covers 4 layers but the model has 3"),
    ({"max_grad_norm": 0}, r"max_grad_norm must be a positive, finite number .*got 0"),  # 0 would freeze the weights
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be .*got -1.0"),  # and a negative one climb the loss
    ({"max_grad_norm": float("nan")}, r"max_grad_norm must be .*got nan"),
    ({"data_parallel": 0}, r"data_parallel must be an integer >= 1 \(replicas of the whole pipeline\), got 0"),
    ({"data_parallel": -2}, r"data_parallel must be an integer >= 1 .*got -2"),
    ({"precision": "fp16", "loss_scale": {"min_scale": -1}}, r"loss scaler: min_scale must be a finite number > 0"),
])
def test_a_bad_option_is_refused_before_anything_runs(option, pattern):
    built: list = []
    raises(pattern, Pipeline, _factories(built), mse, local_devices=2, show_partition=False, bound=5,
           **{"timeout": 5, **option})
    assert built == [] or "partition" in option  # refused before any layer was built (a balance needs the count)


def test_partition_by_time_with_a_sample_that_does_not_fit_names_the_layer():
    bad = layers()
    bad[2] = torch.nn.Linear(5, 8)  # expects 5 features, gets 8
    raises(r"layer 2 \(Linear\) failed on its input \[2, 8\]:float32: RuntimeError: .*Give a sample shaped like",
           Pipeline, bad, mse, partition="time", sample=batch(8), local_devices=2, show_partition=False,
           kind=ValueError)


# ---- bad batches and bad stages (threads) ----------------------------------------------------------------

@pytest.mark.parametrize("given,pattern", [
    (lambda: (batch(8)[0], batch(8)[1][:4]), r"inputs hold 8 samples but its labels 4"),
    (lambda: batch(3), r"batch of 3 samples cannot be split into 4 micro-batches"),
    (lambda: batch(8)[0], r"a batch is \(inputs, labels\); got Tensor"),
    (lambda: ((torch.randn(8, 4), torch.randn(7, 4)), batch(8)[1]), r"disagree on dim 0 \(sizes \[7, 8\]\)"),
])
def test_a_bad_batch_is_refused_with_what_is_wrong(given, pattern):
    p = pipe()
    raises(pattern, p.train_step, given())
    assert torch.isfinite(p.train_step(batch(8)))  # refused before the step: the pipeline is still usable


@pytest.mark.parametrize("partition,devices,schedule,stage", [([4, 3], 2, "1f1b", 0), ([2, 2, 2, 1], 2, "zbv", 1)])
def test_a_stage_returning_none_is_named_not_the_next_one(partition, devices, schedule, stage):
    p = pipe(Counted(0, "none"), partition=partition, devices=devices, schedule=schedule)
    raises(rf"stage {stage} \(rank {stage}\) returned None at F\(stage {stage}, mb 0.*its last layer, layer 3 "
           rf"\(Counted\), returned None.*missing `return`", p.train_step, batch(8))


@pytest.mark.parametrize("mode,pattern", [
    ("raise", r"stage 1 \(rank 1\) failed at F\(stage 1, mb 2\): RuntimeError: boom in micro-batch 2"),
    ("raise-backward", r"stage 1 \(rank 1\) failed at B\(stage 1, mb 2\): RuntimeError: boom in the backward"),
    ("shape", r"stage 1 returned .*\[2, 7\].* for micro-batch 2 but .*\[2, 8\].* for micro-batch 0"),
])
def test_a_failing_stage_thread_names_stage_microbatch_and_action(mode, pattern):
    p = pipe(Counted(2, mode), partition=[3, 2, 2], devices=3)
    raises(pattern, p.train_step, batch(8), kind=PipelineError)
    raises("stopped after an earlier failure", p.train_step, batch(8), bound=2)


class AsTensor(torch.nn.Module):
    """Returns its input as it is: a tensor, where the next layer wants a tuple (as a transformers 5 GPT2Block)."""

    def forward(self, x):
        return x


class TupleUser(torch.nn.Module):
    def forward(self, x):
        hidden, mask = x[0], x[1]
        return hidden * mask[:, :1]


def test_an_error_inside_a_layer_names_the_layer_and_what_it_was_given():
    net = [torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), AsTensor(), TupleUser(),
           torch.nn.Linear(8, 1)]
    p = Pipeline(net, mse, partition=[3, 3], local_devices=2, microbatches=4, show_partition=False, timeout=5)
    raises(r"stage 1 \(rank 1\) failed at F\(stage 1, mb 0\): IndexError: .* \(raised in layer 4 \(TupleUser\), of "
           r"stage 1's layers 3-5; its input, the output of layer 3 \(AsTensor\), was a tensor \[2, 8\]:float32\)$",
           p.train_step, batch(8), kind=PipelineError)
    # in a recompute too (call 1 of the layer is the recompute of micro-batch 0); the first layer of a stage
    # gets its input from the stage before, described as before
    p = pipe(Counted(1, "raise"), partition=[3, 4], at=4, microbatches=2, recompute="always")
    raises(r"failed at RECOMPUTE\(stage 1, mb 0\): RuntimeError: boom in micro-batch 1 \(raised in layer 4 "
           r"\(Counted\), of stage 1's layers 3-6; its input, the output of layer 3 \(Tanh\), was a tensor",
           p.train_step, batch(8))
    raises(r"failed at F\(stage 1, mb 2\): RuntimeError: boom in micro-batch 2 \(raised in layer 3 \(Counted\), of "
           r"stage 1's layers 3-6; its input from stage 0 on device 0 was \[2, 8\]:float32\)",
           pipe(Counted(2, "raise"), partition=[3, 4]).train_step, batch(8))


def test_a_failing_loss_fn_names_the_last_stage():
    def loss_fn(out, labels):
        raise KeyError("labels has no field 'y'")

    raises(r"stage 1 \(rank 1\) failed at F\(stage 1, mb 0\): KeyError", pipe(loss_fn=loss_fn).train_step, batch(8))
    raises(r"loss_fn must return a scalar tensor or a \(sum, count\) pair, got a tensor of shape \[2, 1\]",
           pipe(loss_fn=lambda o, y: (o - y) ** 2).train_step, batch(8))


def test_a_rank_thread_stuck_in_its_own_computation_ends_the_step():
    release = threading.Event()

    class Stuck(torch.nn.Module):
        def forward(self, x):
            if torch.is_grad_enabled() and x.shape[0] == 2 and not release.is_set():
                threading.current_thread().stuck_on_purpose = True
                release.wait(120)
            return x

    p = pipe(Stuck(), partition=[3, 4], timeout=2)
    try:
        raises(r"timed out at .*; rank 1 did not stop \(stuck in its own computation\)", p.train_step, batch(8),
               bound=15)
        raises("stopped after an earlier failure", p.train_step, batch(8), bound=2)
    finally:
        release.set()


def test_save_checkpoint_to_a_folder_no_rank_can_write_names_rank_and_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    p = pipe()
    p.train_step(batch(8))
    raises(rf"checkpoint {re.escape(str(blocker))}/ckpt was not written: rank [01] cannot create the checkpoint "
           rf"folder {re.escape(str(blocker))}/\.ckpt\.partial: \[Errno 20\] Not a directory", p.save_checkpoint,
           blocker / "ckpt")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a-file"]  # nothing written anywhere


def test_check_of_a_random_model_says_the_model_is_random():
    import stagewise

    with within(20):
        report = stagewise.check(random_layers(), mse, batch(8), stages=2, microbatches=4)
        exact = stagewise.check(layers(), mse, batch(8), stages=2, microbatches=4)
    assert not report.ok and not report.deterministic and report.reference_variation > 1e-3
    text = report.format()
    assert re.search(r"FAILED: .*; the model is random, see below\n  the model is not deterministic: two forwards of "
                     r"the unsplit model in one process on the same batch differ by [\d.e-]+ \(relative\).*Set dropout "
                     r"to 0 \(or call model.eval\(\) on the layers\)", text), text
    assert report.to_dict()["deterministic"] is False
    assert exact.ok and exact.deterministic and exact.reference_variation == 0 and "deterministic" not in exact.format()
