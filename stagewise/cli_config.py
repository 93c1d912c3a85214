"""`stagewise train --config FILE`: options from a TOML (or JSON) file, checked as the command line checks them.

Keys are the long options without their dashes, `seq_len` or `seq-len` alike; a value is what the option takes
(`partition = [4, 3, 3, 4]` or `"uniform"`, `plan = true`). Given on the command line, an option overrides the
file; the file overrides a resumed run's saved configuration. A run writes its resolved configuration as
config.toml (and config.json) in its folder: `stagewise train --config runs/x/config.toml` repeats it.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NOT_WRITTEN = ("resume", "fallback")  # they describe an attempt, not the run


def read_config(path: str) -> dict[str, Any]:
    """The file's key/value pairs, keys spelled with `_`; .json as JSON, anything else as TOML."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, keys: Iterable[str]) -> None:
    """Fill the options left unset on the command line (None) from `args.config`, each value checked by its option's
    own type and choices; `parser.error` (exit status 2) on an unknown key or a bad value, naming it."""
    path = getattr(args, "config", None)
    if not path:
        return
    try:
        values = read_config(path)
    except (OSError, ValueError) as err:
        parser.error(f"argument --config: {err}")
    known = list(keys)
    actions = {a.dest: a for a in parser._actions if a.dest in known}
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        parser.error(f"argument --config: {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(unknown)}; the keys are the options of `stagewise train` (seq_len or seq-len): "
                     f"{', '.join(known)}")
    for key, value in values.items():
        if value is None or getattr(args, key, None) is not None:  # unset in the file, or given on the command line
            continue
        setattr(args, key, _checked(parser, path, actions[key], key, value))


def _checked(parser: argparse.ArgumentParser, path: str, action: argparse.Action, key: str, value: Any) -> Any:
    where = f"argument --config: {path}: {key} = {value!r}"
    if action.nargs == 0:  # a flag such as --plan
        if not isinstance(value, bool):
            parser.error(f"{where}: expected true or false")
        return value
    if isinstance(value, bool) or isinstance(value, dict):
        parser.error(f"{where}: expected {'a list, ' if key == 'partition' else ''}a number or a string")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        result = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        parser.error(f"{where}: {err}")
    if action.choices is not None and result not in action.choices:
        parser.error(f"{where}: choose from {', '.join(map(str, action.choices))}")
    return result


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """A flat TOML table of `values` (None values as comments) that `read_config` reads back equal."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in values.items():
        if key in NOT_WRITTEN:
            continue
        lines.append(f"# {key} = (not set)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan" if math.isnan(value) else "-inf" if value < 0 else "inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string
