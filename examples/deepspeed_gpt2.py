"""The seed's DeepSpeed script (src/ch5/pipe_dream.org.py: GPT-2 on DeepSpeed's 1F1B pipeline), on stagewise.

Run it as the seed ran `deepspeed --num_gpus=4 pipe_dream.org.py`:

    stagewise run -n 4 examples/deepspeed_gpt2.py                    # gpt2-tiny, 4 stages, on CPUs or GPUs
    stagewise run -n 2 examples/deepspeed_gpt2.py --steps 3          # a quick look
    stagewise run -n 4 examples/deepspeed_gpt2.py --full             # the seed's GPT-2 (124M), 1024 tokens

What changed from the seed: the two DeepSpeed import lines (marked "was:"). What had to change besides,
because the seed downloads: the model is `stagewise.models`' GPT-2 built from a config (the seed loads
pretrained weights through transformers, and wraps its blocks in the same three kinds of layer), the text is
the Python standard library's sources (or --data) with a byte-level BPE trained on them (cached) instead of
SQuAD and GPT-2's tokenizer, the learning rate suits training from scratch, and the backend is gloo without
GPUs. The model, PipelineModule, initialize, batch_fn, loss_fn and the loop are the seed's.
"""

# ruff: noqa: I001 (the seed's import order, kept so that only the two DeepSpeed lines differ)
import argparse

import stagewise.deepspeed as deepspeed  # was: import deepspeed
import torch
import torch.nn as nn
from stagewise.deepspeed import PipelineModule  # was: from deepspeed import PipelineModule
from torch.optim import Adam
from torch.utils.data import DataLoader
import torch.distributed as dist

from stagewise.data import builtin_corpus, pad_id, read_text_files, token_windows, train_bpe
from stagewise.models import config, gpt2_layers


def create_model_from_config(cfg):
    # the seed: nn.Sequential(GPT2Preprocessing, *GPT2Block x 12, GPT2Postprocessing) from pretrained weights
    return nn.Sequential(*gpt2_layers(cfg))


def collate_fn(batch):
    # the seed: tokenizer.pad({"input_ids": batch}, padding="max_length", max_length=1024)
    return torch.stack([nn.functional.pad(ids, (0, max_length - len(ids)), value=pad) for ids in batch])


def batch_fn(data):
    input_ids = data
    labels = data
    return input_ids, labels


def loss_fn(logits, labels):
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous()

    return nn.CrossEntropyLoss()(
        logits.view(-1, logits.size(-1)),
        labels.view(-1),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="train_steps (the seed: 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="the seed: 16")
    parser.add_argument("--full", action="store_true", help="GPT-2 124M on 1024-token sequences (the seed's)")
    parser.add_argument("--seq-len", type=int, default=None, help="max_length (default 128; --full: 1024)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the BPE trained on the text")
    parser.add_argument("--data", default=None, help="a text file or folder (default: the standard library)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's (the seed: 3e-5, on pretrained weights)")
    args, _ = parser.parse_known_args()  # deepspeed's launcher passes --local_rank, as torchrun may

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # the seed: "nccl"
    world_size, rank = dist.get_world_size(), dist.get_rank()
    batch_size, train_steps = args.batch_size, args.steps
    train_samples = batch_size * train_steps
    max_length = args.seq_len or (1024 if args.full else 128)

    texts = read_text_files(args.data) if args.data else builtin_corpus()
    if rank != 0:
        dist.barrier()  # rank 0 trains the tokenizer once; the others load it from the cache
    tokenizer = train_bpe(texts, vocab_size=args.vocab_size)
    if rank == 0:
        dist.barrier()
    pad = pad_id(tokenizer)  # the seed: tokenizer.pad_token = tokenizer.eos_token

    torch.manual_seed(0)  # every rank builds the same model, as the seed's from_pretrained does
    vocab = max(tokenizer.get_vocab_size(), 50257) if args.full else tokenizer.get_vocab_size()
    cfg = config("gpt2" if args.full else "gpt2-tiny", vocab_size=vocab, n_positions=max(max_length, 128))
    model = PipelineModule(
        create_model_from_config(cfg),
        loss_fn=loss_fn,
        num_stages=world_size,
        partition_method="type:GPT2Block"
        # partition_method selects the layers to balance over the stages
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=Adam(model.parameters(), lr=args.lr),
        config={
            "train_batch_size": batch_size,
            "steps_per_print": 9999999,
            # turn off: https://github.com/microsoft/DeepSpeed/issues/1119
        },
    )
    engine.set_batch_fn(batch_fn)

    datasets = token_windows(texts, tokenizer, max_length - 1)[:train_samples]  # the seed: SQuAD's contexts
    data_loader = iter(
        DataLoader(
            sorted(datasets, key=len, reverse=True),
            # uniform length batching
            # https://mccormickml.com/2020/07/29/smart-batching-tutorial/
            batch_size=batch_size,
            num_workers=0,
            collate_fn=collate_fn,
            shuffle=False,
        )
    )

    for i in range(train_steps):
        loss = engine.train_batch(data_loader)

        if i % 10 == 0 and rank == 0:
            print(f"step: {i}, loss: {loss}")
