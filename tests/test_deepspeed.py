"""stagewise.deepspeed: DeepSpeed's pipeline API (PipelineModule, initialize, the engine) on stagewise.

The seed's DeepSpeed script runs on 2 and 4 processes with the same losses, step for step, as the same model
and optimizer in one process (float64, 1e-10); config keys keep DeepSpeed's meaning or are refused by name.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed_workers import (
    CFG,
    LR,
    batch_fn,
    built_specs,
    loss_fn,
    reference,
    run_many,
    samples,
    specs,
)
from torch import nn
from torch.utils.data import DataLoader

import stagewise.deepspeed as deepspeed
from stagewise import GPipe, spawn
from stagewise.deepspeed import (
    DeepSpeedConfigError,
    LayerSpec,
    PipeDataParallelTopology,
    PipelineModule,
    TiedLayerSpec,
)
from stagewise.deepspeed.config import parse_config
from stagewise.deepspeed.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR
from stagewise.models import config, gpt2_layers, lm_loss
from stagewise.partition import PartitionError

TOL = 1e-10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 models: one intra-op thread (two spin-waiting threads crawl on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOL * abs(y) for x, y in zip(a, b))


# ---- the seed's script on several processes ----

def test_the_seed_script_on_2_processes_equals_one_process(tmp_path):
    """The seed's layout on 2 stages (gradient accumulation over 2 micro-batches), then eval_batch and a checkpoint
    saved, stepped past and loaded back; and the same script with the config naming the interleaved schedule
    (2 stages per device: the layers are laid out again and the user's Adam rebuilt over them)."""
    runs = [dict(variant="seed", num_stages=2, gas=2, micro=2, steps=3, folder=str(tmp_path)),
            dict(variant="seed", num_stages=2, gas=2, micro=2, steps=2, schedule="interleaved")]
    results = spawn(run_many, 2, args=(runs,), timeout=300)
    ref = reference("seed", 2, 2, 2, 2, 3, extra=True)
    for rank, (plain, interleaved) in enumerate(results):
        assert close(plain["losses"], ref["losses"]), (plain["losses"], ref["losses"])
        assert (plain["first"], plain["last"]) == (rank == 0, rank == 1)
        assert abs(plain["eval"] - ref["eval"]) <= TOL * ref["eval"]
        assert plain["logits"] == ((4, 12, CFG.vocab_size) if rank == 1 else None)  # 2 micro-batches of 2
        assert abs(plain["after"] - ref["after"]) <= TOL * ref["after"]
        assert plain["again"] == plain["after"]  # the checkpoint brought back weights, Adam's state and the RNG
        assert (plain["loaded"], plain["client"], plain["steps_loaded"]) == ("mid", {"seen": 3}, 3)
        assert close(interleaved["losses"], ref["losses"][:2])
    assert (tmp_path / "latest").read_text() == "mid"
    names = json.loads((tmp_path / "mid" / "manifest.json").read_text())["names"]
    assert names == [n for n, _ in nn.Sequential(*gpt2_layers(CFG)).state_dict().items()]  # unsplit names


def test_the_seed_script_on_4_processes_equals_one_process():
    """The seed's own layout (4 stages, type:GPT2Block); LayerSpecs with the embedding tied to the head by key
    on 2 stages x 2 data-parallel replicas, each reading its own micro-batches, with the optimizer, schedule
    and clipping from the config; and the seed's script on 2 x 2 with the config naming zbv (a V: each device
    holds two stages, the first device the first and the last)."""
    runs = [dict(variant="seed", num_stages=4, gas=2, micro=2, steps=3),
            dict(variant="specs", num_stages=2, gas=2, micro=2, steps=3),
            dict(variant="seed", num_stages=2, gas=2, micro=2, steps=2, schedule="zbv")]
    results = spawn(run_many, 4, args=(runs,), timeout=300)
    ref_seed = reference("seed", 4, 4, 2, 2, 3)
    ref_specs = reference("specs", 4, 2, 2, 2, 3)
    ref_dp = reference("seed", 4, 2, 2, 2, 2)
    for rank, (seed, spec, v) in enumerate(results):
        assert close(seed["losses"], ref_seed["losses"]), (seed["losses"], ref_seed["losses"])
        assert close(spec["losses"], ref_specs["losses"]), (spec["losses"], ref_specs["losses"])
        assert close(v["losses"], ref_dp["losses"]), (v["losses"], ref_dp["losses"])
        assert (spec["first"], spec["last"]) == (rank < 2, rank >= 2)  # rank = stage x 2 + replica
        assert (v["first"], v["last"]) == (rank < 2, rank < 2)
    # every rank holds only its stage's layers: the seed's 4 stages hold [emb + 1 block, 1, 1, 1 block + head]
    assert [r[0]["params"] for r in results] == [sum(p.numel() for p in nn.Sequential(*gpt2_layers(CFG)[a:b])
                                                     .parameters()) for a, b in ((0, 2), (2, 3), (3, 4), (4, 6))]


@pytest.mark.slow
def test_the_example_runs_under_stagewise_run(tmp_path):
    """`stagewise run -n 2 examples/deepspeed_gpt2.py` (as `deepspeed --num_gpus 2` ran the seed's script)."""
    text = "\n".join((ROOT / "stagewise" / name).read_text() for name in ("gpipe.py", "tree.py", "pipeline.py"))
    (tmp_path / "data.txt").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STAGEWISE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "stagewise.cli", "run", "-n", "2", "--threads", "1",
                          str(ROOT / "examples" / "deepspeed_gpt2.py"), "--steps", "3", "--data",
                          str(tmp_path / "data.txt"), "--vocab-size", "300", "--seq-len", "32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "stage 1" in run.stdout and "step: 0, loss: " in run.stdout


# ---- one process: the engine's parts against plain training ----

FULL_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
               "optimizer": {"type": "Adam", "params": {"lr": LR, "weight_decay": 0.01}},
               "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 6, "warmup_num_steps": 2}},
               "gradient_clipping": 0.1, "steps_per_print": 2, "wall_clock_breakdown": True,
               "zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": False}}


def test_one_process_engine_with_config_optimizer_schedule_and_clipping(tmp_path, capsys):
    """DeepSpeed's Adam (AdamW, decoupled weight decay), WarmupCosineLR stepped after each step, clipping,
    3 accumulated micro-batches, steps_per_print with the wall-clock breakdown, eval_batch and a checkpoint with
    its 'latest' file, against plain training of the same model (LayerSpecs, the tied head in one module)."""
    torch.set_default_dtype(torch.float64)
    model = PipelineModule(specs(), loss_fn=loss_fn, num_stages=1, seed_layers=True)
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=FULL_CONFIG)
    assert loader is None and isinstance(optimizer, torch.optim.AdamW) and isinstance(scheduler, WarmupCosineLR)
    assert (engine.train_batch_size(), engine.gradient_accumulation_steps(), engine.zero_optimization_stage()) == \
        (6, 3, 1)
    engine.set_batch_fn(batch_fn)
    ref = built_specs()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
    ref_sched = WarmupCosineLR(ref_opt, **FULL_CONFIG["scheduler"]["params"])
    data = list(DataLoader(samples(2 * 3 * 6), batch_size=2))

    def ref_step(mbs: list[torch.Tensor]) -> float:
        ref_opt.zero_grad()
        loss = sum(loss_fn(ref(x), x) for x in mbs) / len(mbs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        ref_sched.step()
        return loss.item()

    it = iter(data)
    for k in range(4):
        loss = engine.train_batch(it).item()
        assert abs(loss - ref_step(data[3 * k: 3 * k + 3])) <= TOL * loss
        assert engine.get_lr() == [ref_opt.param_groups[0]["lr"]] == ref_sched.get_last_lr()
        assert engine.global_steps == k + 1
    printed = capsys.readouterr().out
    assert "steps: 2 loss: " in printed and "steps: 4 loss: " in printed and "time (ms) | B: " in printed
    assert "[Rank 0] step=4, skipped=0, lr=" in printed

    with torch.no_grad():
        ref.eval()
        ref_eval = (sum(loss_fn(ref(x), x) for x in data[12:15]) / 3).item()
        ref.train()
    assert abs(engine.eval_batch(iter(data[12:15])).item() - ref_eval) <= TOL * ref_eval
    assert engine.module.training is False
    engine.save_checkpoint(tmp_path, client_state={"epoch": 7})
    assert (tmp_path / "latest").read_text() == "global_step4"
    first = engine.train_batch(iter(data[15:18])).item()
    lr_after = engine.get_lr()
    path, client = engine.load_checkpoint(tmp_path)
    assert Path(path).name == "global_step4" and client == {"epoch": 7} and engine.global_steps == 4
    assert engine.lr_scheduler.last_batch_iteration == 3
    assert engine.train_batch(iter(data[15:18])).item() == first and engine.get_lr() == lr_after
    with pytest.warns(UserWarning, match="unable to find the latest file"):
        assert engine.load_checkpoint(tmp_path / "nothing") == (None, None)  # no 'latest' there: DeepSpeed's answer
    with pytest.raises(RuntimeError, match="only train_batch"):
        engine(data[0])
    engine.pipeline.close()


def test_train_batch_pulls_micro_batches_and_checks_them():
    torch.set_default_dtype(torch.float64)
    model = PipelineModule([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)], topology=PipeDataParallelTopology(1, 1),
                           loss_fn=lambda out, y: ((out - y) ** 2).mean())
    pairs = [(torch.randn(2, 4), torch.randn(2, 2)) for _ in range(6)]
    dataset = [(x[i], y[i]) for x, y in pairs for i in range(2)]
    engine, _, loader, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                config={"train_batch_size": 4, "gradient_accumulation_steps": 2},
                                                training_data=dataset)
    assert len(loader) == 6 and engine.is_first_stage() and engine.is_last_stage()
    first = engine.train_batch()  # from the training data: micro-batches of train_micro_batch_size_per_gpu, in order
    it = iter(pairs)
    assert engine.train_batch(it).item() != first.item() and engine.global_steps == 2
    assert next(it) is pairs[2]  # one step pulled gradient_accumulation_steps micro-batches
    with pytest.raises(TypeError, match="must be an iterator"):
        engine.train_batch(pairs)
    with pytest.raises(TypeError, match="set_batch_fn"):
        engine.train_batch(iter([torch.randn(2, 4)] * 2))
    with pytest.raises(ValueError, match="same structure and shapes"):
        engine.train_batch(iter([(torch.randn(2, 4), torch.randn(2, 2)), (torch.randn(3, 4), torch.randn(3, 2))]))
    engine.pipeline.close()


# ---- the config: DeepSpeed's meaning, or an error naming the key ----

@pytest.mark.parametrize("given,dp,expect", [
    ({"train_batch_size": 16}, 1, (16, 16, 1)),  # the seed's: one micro-batch per step
    ({"train_batch_size": 16}, 2, (16, 8, 1)),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, (16, 2, 4)),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 4}, 2, (16, 2, 4)),
    ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 2, (12, 3, 2)),
    ({"train_micro_batch_size_per_gpu": 3}, 4, (12, 3, 1)),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 2, (12, 3, 2)),
])
def test_batch_sizes_follow_deepspeeds_rule(given, dp, expect):
    cfg = parse_config(given, dp)
    assert (cfg.train_batch_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == expect


@pytest.mark.parametrize("given,match", [
    ({}, "either train_batch_size or train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 3},
     r"12 != 3 x 3 x 2"),
    ({"train_batch_size": 3}, r"3 != 1 x 1 x 2"),
    ({"train_batch_size": 0}, "train_batch_size must be an integer >= 1"),
    ({"train_batch_size": 8, "amp": {"enabled": True}}, "'amp' not supported"),
    ({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale_windoww": 10}}, "'fp16.loss_scale_windoww'"),
    ({"train_batch_size": 8, "fp16": {"enabled": True, "hysteresis": 2}}, "fp16.hysteresis"),
    ({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "cannot be enabled at the same"),
    ({"train_batch_size": 8, "zero_optimization": {"stage": 2}}, "stage 2 is not supported with pipeline"),
    ({"train_batch_size": 8, "zero_optimization": {"stage": 3}}, "stage 3"),
    ({"train_batch_size": 8, "zero_optimization": {"stage": 1, "offload_optimizer": {}}},
     "'zero_optimization.offload_optimizer'"),
    ({"train_batch_size": 8, "pipeline": {"partition": "uniform"}}, "partition_method"),
    ({"train_batch_size": 8, "pipeline": {"activation_checkpoint_interval": 2}}, "activation_checkpoint_interval"),
    ({"train_batch_size": 8, "pipeline": {"schedulee": "1f1b"}}, "'pipeline.schedulee'"),
    ({"train_batch_size": 8, "optimizer": {"type": "Adam", "parms": {}}}, "'optimizer.parms'"),
    ({"train_batch_size": 8, "gradient_clipping": -1}, "gradient_clipping"),
    ({"train_batch_size": 8, "steps_per_print": 0}, "steps_per_print"),
    ({"train_batch_size": 8, "wall_clock_breakdown": "yes"}, "wall_clock_breakdown must be true or false"),
    ({"train_batch_size": 8, "prescale_gradients": True}, "prescale_gradients"),
    ({"train_batch_size": 8, "pipeline": {"schedule": "auto"}}, "'auto'"),
])
def test_unknown_unsupported_or_bad_keys_are_errors_naming_them(given, match):
    with pytest.raises(DeepSpeedConfigError, match=match):
        parse_config(given, dp=2, num_stages=2)


def test_fp16_settings_map_onto_the_loss_scaler_and_bf16_onto_autocast():
    cfg = parse_config({"train_batch_size": 8, "fp16": {"enabled": True, "initial_scale_power": 12,
                                                        "loss_scale_window": 500, "min_loss_scale": 2,
                                                        "hysteresis": 1}}, dp=1)
    assert cfg.precision == "fp16" and cfg.loss_scale == {"init_scale": 4096.0, "growth_interval": 500,
                                                          "min_scale": 2.0}
    model = PipelineModule([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)], num_stages=1,
                           loss_fn=lambda out, y: ((out.float() - y) ** 2).mean())
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config={
        "train_batch_size": 4, "fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 3}})
    it = iter([(torch.randn(4, 4), torch.randn(4, 2)) for _ in range(3)])
    for _ in range(3):
        engine.train_batch(it)
    assert engine.fp16_enabled() and engine.pipeline.last_step["loss_scale"] == 4096.0
    assert engine.pipeline.loss_scalers[0].scale == 8192.0  # grown after loss_scale_window clean steps
    engine.pipeline.close()
    assert parse_config({"train_batch_size": 8, "bfloat16": {"enabled": True}}, dp=1).precision == "bf16"
    assert parse_config({"train_batch_size": 8, "fp16": {"enabled": False}}, dp=1).precision == "fp32"


def test_initialize_refuses_what_it_cannot_honour(tmp_path):
    torch.set_default_dtype(torch.float64)
    model = PipelineModule([nn.Linear(2, 2)], num_stages=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DeepSpeedConfigError, match="both to initialize"):
        deepspeed.initialize(model=model, optimizer=opt, config={"train_batch_size": 2, **{
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}})
    for name, match in (("Lamb", "DeepSpeed's own"), ("NoSuchOpt", "not known")):
        with pytest.raises(DeepSpeedConfigError, match=match):
            deepspeed.initialize(model=model, config={"train_batch_size": 2, "optimizer": {"type": name}})
    with pytest.raises(DeepSpeedConfigError, match="optimizer.params for SGD"):
        deepspeed.initialize(model=model, config={"train_batch_size": 2,
                                                  "optimizer": {"type": "SGD", "params": {"lr": 0.1, "betas": 1}}})
    with pytest.raises(DeepSpeedConfigError, match="'OneCycle' is not supported"):
        deepspeed.initialize(model=model, optimizer=opt,
                             config={"train_batch_size": 2, "scheduler": {"type": "OneCycle", "params": {}}})
    with pytest.raises(DeepSpeedConfigError, match="not found"):
        deepspeed.initialize(model=model, optimizer=opt, config=str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="PipelineModule"):
        deepspeed.initialize(model=nn.Linear(2, 2), config={"train_batch_size": 2})
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 2, "scheduler": {
        "type": "StepLR", "params": {"step_size": 1, "gamma": 0.5}}}))
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=str(tmp_path / "ds.json"))
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)  # torch's schedulers by name, as DeepSpeed
    engine.pipeline.close()


def test_partition_methods_as_deepspeed():
    """The seed's GPT-2 (pre, 12 blocks, post) by type:GPT2Block over 4 stages: DeepSpeed printed [4, 3, 3, 4]."""
    layers = [nn.Identity(), *gpt2_layers(config("gpt2-tiny", n_layer=12, vocab_size=64, n_embd=8, n_head=2))[1:-1],
              nn.Identity()]
    model = PipelineModule(layers, num_stages=1, partition_method="type:GPT2Block")
    assert model.partition(4) == [4, 3, 3, 4] and model.held == list(range(14))
    model.partition_method = "uniform"
    assert model.partition(4) == [4, 4, 3, 3]
    model.partition_method = "parameters"
    assert sum(model.partition(3)) == 14
    model.partition_method = "profile"
    with pytest.raises(ValueError, match=r"'profile' is not one stagewise knows \(DeepSpeed does not implement"):
        model.partition(2)
    model.partition_method = "type:Conv"
    with pytest.raises(PartitionError, match="type:Conv"):
        model.partition(2)
    with pytest.raises(ValueError, match="not divisible by num_stages"):
        PipelineModule(layers, num_stages=3)  # one process


def test_layer_specs_are_built_where_held_with_deepspeeds_seeds():
    built = []

    class Counted(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            built.append(self)

    model = PipelineModule([LayerSpec(Counted, 3, 3), TiedLayerSpec("t", Counted, 3, 3), lambda x: x * 2,
                            TiedLayerSpec("t", Counted, 3, 3, forward_fn=lambda m, x: x @ m.weight)],
                           num_stages=1, seed_layers=True, base_seed=7)
    real = [m for m in built if m.weight.device.type != "meta"]  # counting parameters builds on the meta device
    assert len(real) == 2  # layer 0, and the tied module once
    torch.manual_seed(7)
    assert torch.equal(real[0].weight, Counted(3, 3).weight)  # layer 0 built after seeding base_seed + 0
    assert model.get_submodule("1") is model.get_submodule("3").module  # one module for the key on this rank
    x = torch.randn(2, 3)
    assert torch.allclose(model(x), ((real[1](real[0](x))) * 2) @ real[1].weight)
    with pytest.raises(RuntimeError, match="torch.nn.Module"):
        LayerSpec(lambda: None)


def test_lr_schedules_follow_deepspeeds_formulas():
    def lrs(sched_cls, steps: int, **kw) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = sched_cls(opt, **kw)
        out = [opt.param_groups[0]["lr"]]
        for _ in range(steps):
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    log = lrs(WarmupLR, 4, warmup_min_lr=0.1, warmup_max_lr=1.0, warmup_num_steps=3)
    assert log == pytest.approx([0.1, 0.1, 0.1 + 0.9 * math.log(2) / math.log(3), 1.0, 1.0])
    assert lrs(WarmupLR, 2, warmup_num_steps=4, warmup_type="linear") == pytest.approx([0.0, 0.0, 0.125])
    decay = lrs(WarmupDecayLR, 5, total_num_steps=5, warmup_num_steps=2, warmup_max_lr=1.0, warmup_type="linear")
    assert decay == pytest.approx([0.0, 0.0, 0.5, 1.0, 2 / 3, 1 / 3])
    cos = lrs(WarmupCosineLR, 4, total_num_steps=4, warmup_num_steps=2, warmup_type="linear", cos_min_ratio=0.0)
    half = 0.5 * (1 + math.cos(math.pi / 2)) / 2  # a ratio of the optimizer's lr 0.5: (1 + cos(pi t / T)) / 2
    assert cos == pytest.approx([0.0, 0.0, 0.25, 0.5 * half * 2, 0.0])


# ---- the torchgpipe side: what tests/test_gpipe.py does not cover ----

def test_gpipe_on_2_partitions_trains_gpt2_like_one_module():
    """test_gpipe.py holds the seed's torchgpipe GPT-2 to the plain module on 4 partitions; here on 2."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    layers = gpt2_layers(config("gpt2-tiny", vocab_size=96, n_embd=32, n_head=2, n_positions=16))
    plain = copy.deepcopy(nn.Sequential(*layers))
    model = GPipe(nn.Sequential(*layers), [3, 3], devices=["cpu", "cpu"], chunks=2, show_partition=False)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids, labels = torch.randint(0, 96, (6, 12), generator=g), torch.randint(0, 96, (6, 12), generator=g)
        for m, o in ((model, opt), (plain, ref_opt)):
            o.zero_grad()
            loss = lm_loss(m(ids), labels)
            loss.backward()
            o.step()
            if m is model:
                got = loss.item()
        assert abs(got - loss.item()) <= TOL * loss.item()


def test_reexported_names_match_deepspeeds_modules():
    from stagewise.deepspeed import pipe

    assert pipe.PipelineModule is PipelineModule and pipe.TiedLayerSpec is TiedLayerSpec
