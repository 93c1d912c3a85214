"""The seed's DeepSpeed script on stagewise.deepspeed, in spawned ranks (module-level workers), and its one-process
reference: a float64 tiny GPT-2 from a config, trained on token ids of local text (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import stagewise.deepspeed as deepspeed
from stagewise.deepspeed import LayerSpec, PipelineModule, TiedLayerSpec
from stagewise.deepspeed.lr_schedules import WarmupDecayLR
from stagewise.models import GPT2Block, GPT2Config, GPT2Embedding, gpt2_layers

CFG = GPT2Config(vocab_size=96, n_positions=16, n_embd=16, n_layer=4, n_head=2)
SEQ, LR = 12, 1e-2
# the spec variant's config: AdamW with weight decay from the config, a warm-up-and-decay schedule, clipping
SPEC_CONFIG = {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
               "scheduler": {"type": "WarmupDecayLR",
                             "params": {"total_num_steps": 8, "warmup_num_steps": 2, "warmup_max_lr": LR}},
               "gradient_clipping": 0.05}


def samples(count: int) -> list[torch.Tensor]:
    """Token ids (bytes modulo the vocabulary) of consecutive pieces of stagewise's own source text."""
    text = (Path(deepspeed.__file__).parent / "engine.py").read_bytes()
    ids = torch.tensor(list(text[: count * SEQ]), dtype=torch.int64) % CFG.vocab_size
    return list(ids.view(count, SEQ))


# ---- the seed's functions, as in its script ----

def batch_fn(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = data
    labels = data
    return input_ids, labels


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous()
    return nn.CrossEntropyLoss()(logits.view(-1, logits.size(-1)), labels.view(-1))


# ---- DeepSpeed-style layer specs: the embedding tied to the head by key ----

class FinalNorm(nn.LayerNorm):
    def __init__(self) -> None:
        super().__init__(CFG.n_embd, eps=CFG.layer_norm_epsilon)


def logits_of(embedding: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.wte.weight)


def specs() -> list[LayerSpec]:
    return [TiedLayerSpec("embed", GPT2Embedding, CFG, tied_weight_attr="wte.weight"),
            *(LayerSpec(GPT2Block, CFG) for _ in range(CFG.n_layer)), LayerSpec(FinalNorm),
            TiedLayerSpec("embed", GPT2Embedding, CFG, forward_fn=logits_of, tied_weight_attr="wte.weight")]


def built_specs(base_seed: int = 1234) -> nn.Sequential:
    """The spec list built in one process as DeepSpeed builds it with seed_layers=True (one module per key)."""
    tied: dict[str, nn.Module] = {}
    out: list[nn.Module] = []
    for i, spec in enumerate(specs()):
        torch.manual_seed(base_seed + i)
        if isinstance(spec, TiedLayerSpec):
            first = spec.key not in tied
            module = tied.setdefault(spec.key, spec.build() if first else tied[spec.key])
            out.append(module if spec.forward_fn is None else _Fn(module, spec.forward_fn))
        else:
            out.append(spec.build())
    return nn.Sequential(*out)


class _Fn(nn.Module):
    def __init__(self, module: nn.Module, fn) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, x)


def gpt2_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*gpt2_layers(CFG))


# ---- the run on every rank ----

def run_script(rank: int, world: int, variant: str, num_stages: int, gas: int, micro: int, steps: int,
               folder: str | None = None, schedule: str | None = None) -> dict:
    """The seed's script (variant "seed": the whole model built on every rank, Adam over model.parameters(),
    partition by type:GPT2Block; "specs": LayerSpecs built where they are held, the optimizer, schedule and
    clipping from the config). Replica r reads samples r, r + D, ... in micro-batches. With `folder`: an eval
    batch, and a checkpoint saved, stepped past and loaded back."""
    torch.set_default_dtype(torch.float64)
    dp = world // num_stages
    pipeline = {"pipeline": {"schedule": schedule}} if schedule else {}
    if variant == "seed":
        model = PipelineModule(gpt2_sequential(), loss_fn=loss_fn, num_stages=num_stages,
                               partition_method="type:GPT2Block")
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.Adam(model.parameters(), lr=LR),
            config={"train_batch_size": micro * gas * dp, "gradient_accumulation_steps": gas,
                    "steps_per_print": 9999999, **pipeline})
    else:
        model = PipelineModule(specs(), loss_fn=loss_fn, num_stages=num_stages, seed_layers=True)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(),
            config={"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                    "steps_per_print": 9999999, **SPEC_CONFIG, **pipeline})
    engine.set_batch_fn(batch_fn)
    data = samples(micro * gas * dp * (steps + 2))
    mine = data[engine.module.dp_rank::dp]
    loader = iter(DataLoader(mine[: micro * gas * steps], batch_size=micro, shuffle=False))
    out: dict = {"losses": [engine.train_batch(loader).item() for _ in range(steps)],
                 "first": engine.is_first_stage(), "last": engine.is_last_stage(), "steps": engine.global_steps,
                 "lr": engine.get_lr(), "params": sum(p.numel() for p in model.parameters())}
    if folder is None:
        engine.pipeline.close()
        return out
    rest = list(DataLoader(mine[micro * gas * steps:], batch_size=micro, shuffle=False))
    loss, logits = engine.eval_batch(iter(rest[:gas]), return_logits=True)
    out["eval"], out["logits"] = loss.item(), None if logits is None else tuple(logits.shape)
    engine.save_checkpoint(folder, tag="mid", client_state={"seen": steps})
    out["after"] = engine.train_batch(iter(rest[gas:])).item()
    path, client = engine.load_checkpoint(folder)
    out["loaded"], out["client"], out["steps_loaded"] = Path(path).name, client, engine.global_steps
    out["again"] = engine.train_batch(iter(rest[gas:])).item()
    engine.pipeline.close()
    return out


def run_many(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Several `run_script`s one after the other in the same processes (each with its own engine)."""
    return [run_script(rank, world, **run) for run in runs]


# ---- the one-process references ----

def reference(variant: str, world: int, num_stages: int, gas: int, micro: int, steps: int, extra: bool = False
              ) -> dict:
    """The same model and optimizer in one process: each step's loss is the mean over the micro-batches of every
    replica, its gradient that mean's."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dp = world // num_stages
        model = gpt2_sequential() if variant == "seed" else built_specs()
        if variant == "seed":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=LR)
            sched = None
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
            sched = WarmupDecayLR(opt, **SPEC_CONFIG["scheduler"]["params"])
        data = samples(micro * gas * dp * (steps + 2))
        loaders = [iter(DataLoader(data[r::dp], batch_size=micro, shuffle=False)) for r in range(dp)]
        out: dict = {"losses": []}

        def step_of(micro_batches: list[torch.Tensor]) -> float:
            opt.zero_grad()
            loss = sum(loss_fn(model(x), y) for x, y in map(batch_fn, micro_batches)) / len(micro_batches)
            loss.backward()
            if variant != "seed":
                torch.nn.utils.clip_grad_norm_(model.parameters(), SPEC_CONFIG["gradient_clipping"])
            opt.step()
            if sched is not None:
                sched.step()
            return loss.item()

        for _ in range(steps):
            out["losses"].append(step_of([next(it) for it in loaders for _ in range(gas)]))
        if extra:
            model.eval()
            with torch.no_grad():
                batches = [next(it) for it in loaders for _ in range(gas)]
                out["eval"] = (sum(loss_fn(model(x), y) for x, y in map(batch_fn, batches)) / len(batches)).item()
            model.train()
            out["after"] = step_of([next(it) for it in loaders for _ in range(gas)])
        return out
    finally:
        torch.set_default_dtype(previous)
