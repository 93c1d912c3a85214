"""Models whose stages hand over namedtuples, dicts and mixed structures; run in spawned ranks (module-level)."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn

from stagewise import Pipeline
from stagewise.tree import register_dataclass

Hidden = namedtuple("Hidden", "h ids")


@register_dataclass
@dataclass
class Carry:
    h: torch.Tensor
    mask: torch.Tensor


class ToNamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)

    def forward(self, ids: torch.Tensor) -> Hidden:
        return Hidden(self.emb(ids), ids)


class NamedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Hidden) -> Hidden:
        assert isinstance(x, Hidden), type(x)  # the namedtuple arrives as itself, with its fields
        return Hidden(x.h + torch.tanh(self.lin(x.h)) * (1 + (x.ids % 3).unsqueeze(-1)), x.ids)


class ToMixed(nn.Module):
    """A dict holding a tuple with a string and an int, a float tensor needing no gradient, and None."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Hidden) -> dict:
        h = self.lin(x.h)
        return {"pair": (h, "tag", 3), "scale": torch.ones_like(h[..., :1]) * 0.5, "none": None, "ids": x.ids}


class MixedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: dict) -> Carry:
        h, tag, k = x["pair"]
        assert tag == "tag" and k == 3 and x["none"] is None, x
        return Carry(torch.relu(self.lin(h)) * x["scale"] * k, (x["ids"] > 2).to(h.dtype))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 9)

    def forward(self, x: Carry) -> torch.Tensor:
        assert isinstance(x, Carry), type(x)
        return self.out(x.h) * x.mask.unsqueeze(-1)


def layers(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [m.double() for m in (ToNamed(), NamedBlock(), NamedBlock(), ToMixed(), MixedBlock(), Head())]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 9, (7, 5), generator=g), torch.randint(0, 9, (7, 5), generator=g)


def reference() -> tuple[float, dict[str, torch.Tensor]]:
    model = nn.Sequential(*layers())
    ids, labels = batch()
    loss = loss_fn(model(ids), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def structured_parity(rank: int, world: int, schedule: str, m: int, local: bool = False) -> dict:
    """Worst relative error of the loss and of every gradient against one process."""
    torch.set_default_dtype(torch.float64)
    ref_loss, ref_grads = reference()
    pipe = Pipeline(layers(), loss_fn, schedule=schedule, microbatches=m, timeout=20, show_partition=False,
                    local_devices=world if local else None)
    loss = pipe.train_step(batch()).item()
    grads = {n: p.grad for n, p in pipe.named_parameters()}
    pipe.close()
    err = max(((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n, g in grads.items())
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": err, "names": sorted(grads)}
