"""The command line's option types and checks: every option is checked before anything starts.

argparse calls the types below while it parses, so a bad value ends the command at once with
argparse's message and exit status 2 (`stagewise train: error: argument --microbatches: must be
>= 1, got 0`), before any data is prepared, any process is started or any folder is written.
`check_train` then checks what depends on several options (the schedule for these stages,
micro-batches and virtual stages; a batch large enough to split; a balance that covers the model), in
the same words. Nothing here imports torch at parse time: model names are looked up only when
`--model` is given or the help is shown.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PARTITION_HELP = "uniform, parameters, type:REGEX, time, memory, auto, or layer counts per stage such as 4,3,3,4"


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def _float_above(text: str, low: float, strict: bool) -> float:
    what = f"> {low:g}" if strict else f">= {low:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float_above(text, 0.0, strict=True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _float_above(text, 0.0, strict=False)


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def port(text: str) -> int:
    value = nonnegative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def schedule_spec(text: str) -> str:
    """A registered schedule name, or an existing schedule file (.csv/.txt)."""
    from stagewise.schedules.registry import SCHEDULES, names

    if text == "auto" or text in SCHEDULES or (text.endswith((".csv", ".txt")) and Path(text).is_file()):
        return text
    raise argparse.ArgumentTypeError(f"unknown schedule {text!r}; choose one of {names()}, or give a "
                                     "schedule file (.csv)")


def recompute_spec(text: str) -> str:
    """An argparse type: never, except_last, always, or a number of layers >= 1 per checkpointed group."""
    if text in ("never", "except_last", "always", "auto") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected never, except_last, always, auto or a number of layers >= 1, got "
                                     f"{text!r}")


def auto_or(spec: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: "auto" (the planner chooses), or what `spec` accepts."""
    def parse(text: str) -> Any:
        return text if text == "auto" else spec(text)

    parse.__name__ = getattr(spec, "__name__", "value")  # argparse names the type in its messages
    return parse


def memory_spec(text: str) -> str:
    """Bytes, with an optional unit: 2GiB, 512MiB, 1.5GB, 3e9."""
    from stagewise.partition.units import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return text


def partition_spec(text: str) -> str | list[int]:
    """A partition method name, `type:REGEX`, or layer counts per stage (`4,3,3,4`)."""
    from stagewise.partition import METHODS

    if re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*,?\s*", text):
        counts = [int(x) for x in text.split(",") if x.strip()]
        if any(c < 1 for c in counts):
            raise argparse.ArgumentTypeError(f"every stage needs at least one layer, got {text!r}")
        return counts
    if text.startswith("type:"):
        try:
            re.compile(text[5:])
        except re.error as err:
            raise argparse.ArgumentTypeError(f"{text!r}: the regular expression does not compile: {err}") from None
        return text
    if text in METHODS and text != "type:REGEX":
        return text
    raise argparse.ArgumentTypeError(f"unknown partition {text!r}; use {PARTITION_HELP}")


def writable_folder(text: str) -> str:
    """A folder this process can create or write in (a probe file is created there and removed at once)."""
    path = Path(text).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write the folder {text!r}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".stagewise-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write the folder {text!r}: {probe}: {err.strerror}") from None
    return text


def existing_path(text: str) -> str:
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r}")
    return text


class LazyChoices(Sequence[str]):
    """argparse choices computed on first use (the model names need torch; plain parsing must not import it)."""

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load: Callable[[], Sequence[str]] = load
        self._items: list[str] | None = None

    def _all(self) -> list[str]:
        if self._items is None:
            self._items = list(self._load())
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def _model_names() -> list[str]:
    from stagewise.models import CONFIGS

    return list(CONFIGS)


def _all_model_names() -> list[str]:
    from stagewise.models import CONFIGS, FAMILIES

    return [*CONFIGS, *(f"hf:{name}" for name in FAMILIES)]


class ModelChoices(LazyChoices):
    """The built-in GPT-2 names, `hf:FAMILY`, and any folder holding a config.json (a Hugging Face model)."""

    def __contains__(self, value: object) -> bool:
        return super().__contains__(value) or (isinstance(value, str) and (Path(value).expanduser() /
                                                                          "config.json").is_file())

    def __iter__(self) -> Iterator[str]:  # argparse's help and error list these; a folder PATH is said in words
        return iter([*self._all(), "PATH"])


GPT2_MODELS = LazyChoices(_model_names)
MODELS = ModelChoices(_all_model_names)


class ListModels(argparse.Action):
    """`--list-models`: print what `--model` takes and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list the models --model takes (built-in GPT-2, hf:FAMILY, a local folder) and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from stagewise.models.hf import describe_models

        print(describe_models())
        parser.exit()


def hf_model_problem(name: str) -> str | None:
    """Why `--model name` cannot be used here (a Hugging Face model without transformers installed), or None."""
    import importlib.util

    hf = name.startswith("hf:") or (Path(name).expanduser() / "config.json").is_file()  # no torch import here
    if hf and importlib.util.find_spec("transformers") is None:
        return f"{name} is a Hugging Face model and needs the `transformers` package: pip install 'stagewise[hf]'"
    return None


def check_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What depends on several options of `stagewise train`; `parser.error` (exit status 2) on the first problem.
    With the planner choosing (`--plan`, or the schedule or m left "auto"), what it holds fixed is checked."""
    from stagewise.schedules import ScheduleError
    from stagewise.schedules.registry import resolve_schedule

    plan = bool(getattr(args, "plan", False))
    m = args.microbatches if isinstance(args.microbatches, int) and not plan else None
    stages = None
    if not plan and args.schedule != "auto":
        try:  # with m left to the planner, probed with m = P
            stages = resolve_schedule(args.schedule, args.stages, m or args.stages, args.virtual_stages,
                                      data_parallel=args.dp).num_stages
        except (ScheduleError, ValueError) as err:
            option = "--virtual-stages" if args.virtual_stages is not None and "virtual" in str(err) else "--schedule"
            parser.error(f"argument {option}: {err}")
    if m is not None and args.batch_size < args.dp * m:
        split = f"{args.dp} data-parallel replicas x {m}" if args.dp > 1 else f"{m}"
        parser.error(f"argument --batch-size: a batch of {args.batch_size} samples cannot be split into {split} "
                     f"micro-batches; use --batch-size >= {args.dp * m} or fewer --microbatches")
    if getattr(args, "shard", "none") != "none":  # (torch is imported only then)
        from stagewise.runtime.sharding import check_shard

        try:
            check_shard(args.shard, args.dp, None, args.precision, args.compile)
        except ValueError as err:
            parser.error(f"argument --shard: {str(err).replace('data_parallel=', '--dp ')}")
    if args.batch_size < args.dp:
        parser.error(f"argument --batch-size: a batch of {args.batch_size} samples cannot feed {args.dp} "
                     f"data-parallel replicas; use --batch-size >= {args.dp}")
    if not args.pretrained and (problem := hf_model_problem(args.model)):
        parser.error(f"argument --model: {problem}")
    if isinstance(args.partition, list) and not args.pretrained and not plan:
        from stagewise.models import config
        from stagewise.models.hf import is_hf_model, layer_count

        # embedding, the blocks, the head
        layers = layer_count(args.model) if is_hf_model(args.model) else config(args.model).n_layer + 2
        runs = {stages} if stages is not None else {args.stages * v for v in range(1, 5)}
        if len(args.partition) not in runs or sum(args.partition) != layers:
            where = f"this schedule runs {stages} stages" if stages is not None else \
                f"the schedules run {args.stages} x virtual_stages stages"
            parser.error(f"argument --partition: {','.join(map(str, args.partition))} gives {len(args.partition)} "
                         f"stages and {sum(args.partition)} layers, but {args.model} has {layers} layers (embedding, "
                         f"{layers - 2} blocks, head) and {where}")
