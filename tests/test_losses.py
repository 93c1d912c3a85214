"""Losses as (sum, count) pairs: the token mean of padded batches, exact under any split, accumulation and
replication; the scalar form's meaning; and the refusals."""

from __future__ import annotations

import pytest
import torch
from toy import (
    CountedTokenLoss,
    counted_token_loss,
    loss_fn,
    make_batch,
    make_layers,
    make_padded_batch,
    make_tied_layers,
    token_loss,
)

import stagewise
from stagewise import Pipeline, PipelineError
from stagewise.models import causal_lm_loss
from stagewise.runtime.loss import LossError, mean_of, split_loss


@pytest.mark.parametrize("schedule,P,m", [("1f1b", 2, 4), ("zbv", 2, 3), ("interleaved", 2, 2), ("gpipe", 4, 5),
                                          ("dualpipev", 2, 4), ("zb-h2", 4, 8)])
def test_a_pair_loss_on_padded_batches_equals_the_unsplit_token_mean(schedule, P, m):
    report = stagewise.check(make_tied_layers(blocks=5), token_loss, make_padded_batch(11, 6), schedule=schedule,
                             stages=P, microbatches=m)
    assert report.ok, report.format()


def test_the_scalar_form_is_the_sample_mean_so_padding_makes_it_differ_from_the_token_mean():
    """Each micro-batch's mean weighted by its samples: exact for a sample mean, not for a padded token mean."""
    def token_mean(logits, labels):
        return mean_of(token_loss(logits, labels))

    padded = make_padded_batch(8, 6, seed=3)
    assert not stagewise.check(make_layers(), token_mean, padded, stages=2, microbatches=4).ok
    assert stagewise.check(make_layers(), token_mean, make_batch(8, 6), stages=2, microbatches=4).ok
    assert stagewise.check(make_layers(), token_loss, padded, stages=2, microbatches=4).ok


@pytest.mark.parametrize("loss", [token_loss, counted_token_loss], ids=["divided-at-step", "counted-ahead"])
def test_accumulated_calls_step_on_the_token_mean_of_all_of_them_and_report_it(loss):
    parts = [make_padded_batch(5, 6, seed=s) for s in (1, 2, 3)]
    full = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    model = torch.nn.Sequential(*make_layers())
    total, count = token_loss(model(full[0]), full[1])
    (total / count).backward()
    pipe = Pipeline(make_layers(), loss, microbatches=2, local_devices=2, show_partition=False)
    try:
        calls = [pipe.train_step(p, step=k == 2).item() for k, p in enumerate(parts)]
        for part, got in zip(parts, calls):  # each call returns its own token mean
            s, c = token_loss(model(part[0]), part[1])
            assert got == pytest.approx((s / c).item(), rel=1e-12)
        assert pipe.last_step["loss"] == pytest.approx((total / count).item(), rel=1e-12)
        assert pipe.last_step["count"] == count.item()
        want = dict(model.named_parameters())
        for name, p in pipe.named_parameters():
            assert (p.grad - want[name].grad).abs().max() <= 1e-12 * want[name].grad.abs().max()
        out = pipe.eval_step(full)
        assert out["loss"].item() == pytest.approx((total / count).item(), rel=1e-12)
    finally:
        pipe.close()


def test_causal_lm_loss_counts_label_tokens_and_shifts_like_transformers():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    total, count = causal_lm_loss(logits, labels)
    assert count.item() == 7
    assert total.item() == pytest.approx(7 * torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item(), rel=1e-12)
    total, count = causal_lm_loss(logits, labels, shift=True)
    assert count.item() == 5  # position t against label t + 1
    assert total.item() == pytest.approx(5 * torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item(), rel=1e-12)


@pytest.mark.parametrize("value,pattern", [
    (torch.ones(2), r"scalar tensor or a \(sum, count\) pair, got a tensor of shape \[2\]"),
    ((torch.ones(2), 3), r"first item \(the sum\) is a tensor of shape \[2\]"),
    ((torch.tensor(1.0), -1), r"count is -1; it must be a number >= 0"),
    ((torch.tensor(1.0), torch.ones(2)), r"count is a tensor of shape \[2\]"),
    ("x", r"got str"),
])
def test_a_loss_that_is_neither_form_is_refused(value, pattern):
    with pytest.raises(LossError, match=pattern):
        split_loss(value)


def _pipe(loss, schedule: str = "1f1b") -> Pipeline:
    return Pipeline(make_layers(), loss, schedule=schedule, microbatches=2, local_devices=2, show_partition=False,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_mixing_pairs_and_scalars_and_an_all_ignored_step_are_refused():
    calls = []

    def flip(logits, labels):
        calls.append(1)
        return token_loss(logits, labels) if len(calls) % 2 else loss_fn(logits, labels)

    pipe = _pipe(flip)
    with pytest.raises(PipelineError, match=r"pair for some micro-batches and a scalar for others"):
        pipe.train_step(make_batch(4, 5))
    pipe.close()
    ids, labels = make_batch(4, 5)
    pipe = _pipe(token_loss)
    with pytest.raises(PipelineError, match=r"counted 0 items"):
        pipe.train_step((ids, torch.full_like(labels, -100)))
    pipe.close()


def test_an_asynchronous_schedule_refuses_a_pair_loss_naming_why():
    pipe = _pipe(token_loss, schedule="pipedream")
    with pytest.raises(PipelineError, match=r"needs every count of a batch before its step; schedule 'pipedream'"):
        pipe.train_step(make_batch(4, 5))
    pipe.close()


def test_a_count_method_that_disagrees_with_the_returned_counts_is_refused():
    class Miscounted(CountedTokenLoss):
        def count(self, labels):
            return super().count(labels) + 1

    pipe = _pipe(Miscounted())
    with pytest.raises(PipelineError, match=r"loss_fn.count\(labels\) gave \d+ items .* returned counts summing to"):
        pipe.train_step(make_padded_batch(4, 5))
    pipe.close()


def test_a_loss_counted_ahead_matches_the_unsplit_mean_inside_float32_code():
    """A model that computes in float32 inside a float64 model (as RMSNorm in transformers does): counted ahead,
    each backward starts from 1 / count as the unsplit mean's does, so the float32 code rounds the same values."""
    class Float32Inside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 6).double()

        def forward(self, x: dict) -> dict:
            h = self.lin(x["h"].float().double()).float()
            return {**x, "h": (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).double()}

    torch.manual_seed(0)
    layers = make_layers(blocks=3)
    layers = layers[:2] + [Float32Inside()] + layers[2:3] + [Float32Inside()] + layers[3:]
    report = stagewise.check(layers, counted_token_loss, make_padded_batch(9, 6, seed=4), schedule="zbv", stages=2,
                             microbatches=3)
    assert report.ok, report.format()
