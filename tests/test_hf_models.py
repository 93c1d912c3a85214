"""Hugging Face causal LMs that declare a pipeline plan, as layer lists (`stagewise.models.from_transformers`).

Every family is built from a tiny config (no download) and proven twice: the converted list gives the model's own
logits and loss on padded batches (eager and sdpa attention), and `stagewise.check` holds the pipelined loss and
every gradient (float64, P=2 and 4, 1f1b and zbv, tied and untied) to the unsplit model's.

Tolerances. Every family here computes parts of its forward in float32 whatever the model's dtype: RMSNorm
upcasts (`hidden.to(torch.float32)`) and eager attention's softmax runs in float32. The token-mean loss
(`CausalLMLoss`) counts a batch's label tokens ahead, so each micro-batch's backward starts from 1 / count exactly
as the unsplit mean's does and the float32 islands round the same values: Llama, Mistral, Qwen2, Qwen3, Phi-3 and
OLMo2 agree to 1e-10 (about 1e-15 here) whatever the token count. Gemma, Gemma 2 and Gemma 3 are held to 1e-6:
their RMSNorm (the weight's product included) runs entirely in float32, so a micro-batch's rows round apart from
the whole batch's; they agree to 1e-10 once it runs in float64 (`test_gemma_in_float64_throughout_is_exact`). A
loss that does not count ahead (`divided_at_step`) has the step divide the summed gradients instead: the same mean,
rounded differently by the float32 islands (about 2e-7, 1.8e-6 at worst: OLMo2, eager), held to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagewise
from stagewise.models import CausalLMLoss, causal_lm_loss, from_transformers
from stagewise.models.hf import TIE_KEY, ModelLayers, build, save_pretrained, small_config

transformers = pytest.importorskip("transformers")

VOCAB = 96
WINDOW = 6  # sliding window of Mistral and Gemma 2/3: shorter than the sequences, longer than any padding
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2"]
FLOAT32_NORM = {"gemma", "gemma2", "gemma3"}  # RMSNorm entirely in float32: 1e-6 even with the same grad scale
NO_SDPA = {"gemma2"}  # transformers refuses sdpa for Gemma 2 (attention soft-capping)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_rank():
    """Tiny matrices gain nothing from intra-op threads; with a thread per pipeline device they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str, *, tie: bool | None = None, layers: int = 6, attn: str = "eager") -> nn.Module:
    """A float64 model of `family`: 32 wide, 4 heads of 8 (2 for keys and values), `layers` decoder layers."""
    extra = {"sliding_window": WINDOW} if family in ("mistral", "gemma2", "gemma3") else {}
    if tie is not None:
        extra["tie_word_embeddings"] = tie
    cfg = small_config(family, VOCAB, 64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)
    return build(cfg, seed=0, attn_implementation=attn).double()


def padded_batch(lengths: tuple[int, ...] | list[int] = (10, 7, 10, 5, 9, 10, 6, 8), t: int = 10,
                 seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"input_ids", "attention_mask"}, labels): rows right-padded after `lengths` tokens, labels = input_ids
    with -100 at the padding (transformers-style, shifted by the loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), t), generator=g)
    mask = torch.ones_like(ids)
    for r, n in enumerate(lengths):
        mask[r, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


token_mean = CausalLMLoss(shift=True)  # transformers-style labels (= input_ids), counted ahead


def divided_at_step(logits: torch.Tensor, labels: torch.Tensor):
    """The same pair without `count`: the step divides the summed gradients by the count."""
    return causal_lm_loss(logits, labels, shift=True)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_forward(family: str, attn: str) -> None:
    """The unsplit layer list gives the model's own logits on a padded batch, its gradients, and its loss (labels=,
    which transformers computes in float32: 1e-6)."""
    if attn == "sdpa" and family in NO_SDPA:
        pytest.skip(f"transformers has no sdpa attention for {family}")
    model = tiny(family, layers=2, attn=attn).eval()
    layers = from_transformers(model)
    assert isinstance(layers, ModelLayers) and layers.config is model.config
    assert len(layers) == 2 + 2  # embedding, the decoder layers, norm + head
    inputs, labels = padded_batch()
    out = model(**inputs, labels=labels)
    ours = nn.Sequential(*layers)
    logits = ours(inputs)
    assert logits.shape == (8, 10, VOCAB)
    assert torch.equal(logits, out.logits)
    total, count = token_mean(logits, labels)
    assert abs((total / count).item() - out.loss.item()) <= 1e-6 * out.loss.item()
    params = list(model.parameters())
    total_hf, count_hf = token_mean(out.logits, labels)
    want = torch.autograd.grad(total_hf / count_hf, params)
    got = torch.autograd.grad(total / count, params)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert torch.equal(g, w), name
    # input_ids alone: no mask rides along, and the logits are the model's
    assert torch.equal(ours(inputs["input_ids"]), model(input_ids=inputs["input_ids"]).logits)


CASES = [(2, "1f1b"), (2, "zbv"), (4, "1f1b"), (4, "zbv")]
POW2 = [10, 7, 10, 8, 9, 10, 8, 10]  # row lengths: 64 label tokens (a power of two)
ODD = [10, 7, 10, 5, 9, 10, 6, 8]  # 57 label tokens


def tolerance(family: str) -> float:
    return 1e-6 if family in FLOAT32_NORM else 1e-10


def run_checks(layers, family: str, stages: int, schedule: str) -> None:
    for lengths, loss, tol in ((POW2, token_mean, tolerance(family)), (ODD, token_mean, tolerance(family)),
                               (ODD, divided_at_step, 1e-5)):
        batch = padded_batch(lengths=lengths)
        report = stagewise.check(layers, loss, batch, schedule=schedule, stages=stages, microbatches=4,
                                 tolerance=tol)
        assert report.ok, report.format()
        assert len(report.balance) == (2 * stages if schedule == "zbv" else stages)


@pytest.mark.parametrize(("stages", "schedule"), CASES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_exact(family: str, tie: bool, stages: int, schedule: str) -> None:
    """Pipelined (threads) against one process in float64 on padded batches with attention masks (eager): the
    token-mean loss and every gradient, to 1e-10 (Gemma's 1e-6) with 64 or 57 label tokens; to 1e-5 with a loss
    divided at the step."""
    model = tiny(family, tie=tie)
    layers = from_transformers(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == tie and (getattr(model.lm_head.weight, "stagewise_tie", None) == TIE_KEY) == tie
    run_checks(layers, family, stages, schedule)


@pytest.mark.slow
@pytest.mark.parametrize(("stages", "schedule"), CASES)
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NO_SDPA))
def test_pipeline_exact_sdpa(family: str, stages: int, schedule: str) -> None:
    """The same with sdpa attention (a micro-batch without padding gets no mask and sdpa's causal path)."""
    run_checks(from_transformers(tiny(family, attn="sdpa")), family, stages, schedule)


def test_gpipe_takes_the_list() -> None:
    """GPipe (one process, a device per partition) runs the list as it is: the model's loss and gradients."""
    import copy

    layers = from_transformers(tiny("llama", tie=True))
    reference = nn.Sequential(*copy.deepcopy(nn.ModuleList(layers)))
    inputs, labels = padded_batch()
    total, count = token_mean(reference(inputs), labels)
    (total / count).backward()
    gpipe = stagewise.GPipe(nn.Sequential(*layers), balance=[2, 3, 3], devices=["cpu"] * 3, chunks=4,
                            show_partition=False)
    got_total, got_count = token_mean(gpipe(inputs), labels)
    (got_total / got_count).backward()
    assert abs((got_total / got_count - total / count).item()) <= 1e-12
    for (name, p), q in zip(reference.named_parameters(), gpipe.parameters()):
        assert relative(q.grad, p.grad) <= 1e-10, name


def test_gemma_in_float64_throughout_is_exact(monkeypatch) -> None:
    """With Gemma's RMSNorm in float64 the pipeline agrees to 1e-10: its 1e-6 is the family's float32."""
    from transformers.models.gemma import modeling_gemma

    def rms_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", rms_norm)
    layers = from_transformers(tiny("gemma", tie=True))
    for stages, schedule in [(2, "1f1b"), (4, "zbv")]:
        report = stagewise.check(layers, token_mean, padded_batch(lengths=POW2), schedule=schedule, stages=stages,
                                 microbatches=4)
        assert report.tolerance == 1e-10 and report.ok, report.format()


def test_gpt2_through_the_same_entry_point(tmp_path) -> None:
    """A GPT2LMHeadModel converts through the one entry point (weights copied) and keeps its config: the export
    keeps the original's bos/eos ids and logits."""
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=3,
                                 eos_token_id=5)
    model = transformers.GPT2LMHeadModel(hc).eval()
    layers = from_transformers(model)
    assert isinstance(layers, ModelLayers) and layers.config.bos_token_id == 3
    ids = padded_batch()[0]["input_ids"]
    with torch.no_grad():
        assert relative(nn.Sequential(*layers).eval()(ids), model(ids).logits) <= 1e-5
    out = save_pretrained(nn.Sequential(*layers).state_dict(), tmp_path / "hf", layers.config)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (3, 5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_refuses_a_model_without_a_plan() -> None:
    """A model whose config declares no pipeline plan is refused naming its class and what to do."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, is_decoder=True)
    model = transformers.BertLMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"cannot convert BertLMHeadModel: it declares no pipeline plan"):
        from_transformers(model)
    with pytest.raises(ValueError, match="pass your own list of layers"):
        from_transformers(nn.Linear(2, 2))


def test_refuses_a_forward_that_does_more_than_its_plan() -> None:
    """A causal LM whose forward changes the logits beyond embed -> layers -> norm -> head fails verification."""

    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = Scaled(tiny("llama", layers=2).config)
    with pytest.raises(ValueError, match=r"cannot convert Scaled: the converted layers' logits differ"):
        from_transformers(model)
    assert len(from_transformers(model, verify=False)) == 4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_export_round_trip(family: str, tmp_path) -> None:
    """A trained pipeline's checkpoint exports to a folder AutoModelForCausalLM loads with the same logits."""
    model = tiny(family, layers=2).float()
    layers = from_transformers(model)
    inputs, labels = padded_batch()
    pipe = stagewise.Pipeline(layers, token_mean, local_devices=2, microbatches=2, show_partition=False,
                              optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    try:
        pipe.train_step((inputs, labels))
        pipe.save_checkpoint(tmp_path / "ckpt", step=1)
    finally:
        pipe.close()
    out = stagewise.export(tmp_path / "ckpt", tmp_path / "hf", config=layers.config)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    ours = nn.Sequential(*layers).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ours(inputs))
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
