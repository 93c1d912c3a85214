"""The documentation cannot rot: every ```python block of the guides (docs/**/*.md) runs as written, in a
subprocess of its own with one intra-op thread, unless the line just before it says why it cannot:

    <!-- not run: needs 4 GPUs -->

(an HTML comment: invisible on the site; the reason is required). Such a marker must stand before a python
block. The home page's "Use it on your model" block is the README's, which tests/test_readme.py runs: here it is
only checked to be that block. Shell blocks and `inline code` are not run, but every `stagewise SUBCOMMAND` they
name must exist and every --option they give it must be one of its options, and every `make TARGET` must be a
Makefile target. docs/benchmarks.md must be what benchmarks/pages.py writes from the committed JSON.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))
BLOCK_TIMEOUT_S = 120

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n"
                   r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*not run\b(?P<rest>.*?)-->", re.S)
SHELL = {"", "bash", "sh", "shell", "console", "text"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    info: str
    code: str
    reason: str | None  # the "not run" marker's reason, None when the block is to run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip()
        last = before.rsplit("\n", 1)[-1].strip()
        marker = MARKER.fullmatch(last) if last.startswith("<!--") else None
        if marker is None and last.endswith("-->") and "<!--" in before:  # a comment over several lines
            start = before.rindex("<!--")
            marker = MARKER.fullmatch(before[start:].strip())
        reason = None
        if marker is not None:
            reason = marker.group("rest").strip().removeprefix(":").strip()
        info = m.group("info").strip()
        lang = info.split()[0].lower() if info else ""
        code = "\n".join(line[len(m.group("indent")):] for line in m.group("body").splitlines())
        found.append(Block(page, text[:m.start()].count("\n") + 1, lang, info, code, reason))
    return found


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang in ("python", "py", "python3")]
README_BLOCK = "the README's block"  # the reason that marks the home page's copy of the README's block


def test_the_guides_have_python_blocks_and_every_marker_gives_a_reason():
    assert len(PYTHON) >= 4, [b.where for b in PYTHON]
    for b in PYTHON:
        assert b.info == b.lang, (f"{b.where}: the fence says {b.info!r}; to skip a block put "
                                  "<!-- not run: REASON --> on the line before it, nothing after the language")
        if b.reason is not None:
            assert len(b.reason) >= 10, f"{b.where}: a block that is not run must say why: <!-- not run: REASON -->"
    for page in PAGES:
        text = page.read_text()
        marked = [b for b in blocks(page) if b.reason is not None]
        where = page.relative_to(ROOT)
        assert len(MARKER.findall(text)) == len(marked), f"{where}: a <!-- not run --> marker stands before no block"
        assert all(b.lang in ("python", "py", "python3") for b in marked), \
            f"{where}: only python blocks run, so only they take a <!-- not run --> marker"


@pytest.mark.parametrize("block", [b for b in PYTHON if b.reason is None], ids=lambda b: b.where)
def test_a_guide_block_runs_as_written(block: Block, tmp_path: Path):
    script = tmp_path / "block.py"
    script.write_text(block.code + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "STAGEWISE_CACHE": str(tmp_path / "cache")}
    try:
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where} ran past {BLOCK_TIMEOUT_S} s: make it smaller, or mark it "
                    "<!-- not run: REASON -->")
    assert out.returncode == 0, (f"{block.where} does not run (fix it, or mark it <!-- not run: REASON --> if it "
                                 f"cannot run here):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def _without_comments(code: str) -> list[str]:
    return [line.split("  #")[0].rstrip() for line in code.splitlines() if line.split("  #")[0].strip()]


def test_the_home_page_block_is_the_readme_block_that_test_readme_runs():
    readme = ROOT / "README.md"
    section = readme.read_text().index("## Use it on your model")  # the block tests/test_readme.py runs
    ran = next(b for b in blocks(readme) if b.lang == "python" and b.line > readme.read_text()[:section].count("\n"))
    copies = [b for b in PYTHON if b.reason is not None and README_BLOCK in b.reason]
    assert [b.page.name for b in copies] == ["index.md"]
    assert _without_comments(copies[0].code) == _without_comments(ran.code), \
        f"{copies[0].where} is not the README's block any more: make them the same code, or let it run here"


# ---- shell blocks and inline code: the commands they name exist


HELPS = """
import argparse, json, sys
from stagewise.cli import build_parser
sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
json.dump({name: parser.format_help() for name, parser in sub.choices.items()}, sys.stdout)
"""


@cache
def _helps() -> dict[str, str]:
    """What `stagewise SUB --help` prints, per subcommand (one process for all; `bench` hands its options to
    benchmarks/bench_vs_torch.py, so its own --help is asked for)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", HELPS], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    helps = json.loads(out.stdout)
    bench = subprocess.run([sys.executable, "-m", "stagewise.cli", "bench", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
    assert bench.returncode == 0, bench.stderr[-2000:]
    helps["bench"] += bench.stdout
    return helps


COMMAND = re.compile(r"(?:^|[\s`(])(?:\$ )?(?:[A-Z_]+=\S+ )*stagewise (?P<rest>[a-z][^\n`]*)")


def _commands() -> list[tuple[str, str, str]]:
    """(where, subcommand, the rest of the line) for every `stagewise SUB ...` in a shell block or inline code."""
    found: list[tuple[str, str, str]] = []

    def add(where: str, text: str) -> None:
        for m in COMMAND.finditer(text):
            # up to a pipe, a comment, the next command (`[--a X | --b Y]` is a usage line's choice, not a pipe)
            command = re.split(r"\s(?:\|(?!\s*-)|#|&&|;|>)", m.group("rest"))[0]
            sub, _, rest = command.partition(" ")
            if not sub.endswith(":"):  # `stagewise train: error: ...` is what it prints
                found.append((where, sub.rstrip(".,)"), rest))

    for page in [*PAGES, ROOT / "README.md"]:
        for b in blocks(page):
            if b.lang in SHELL:
                for line in b.code.replace("\\\n", " ").splitlines():
                    add(b.where, line)
        for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", page.read_text())):
            add(str(page.relative_to(ROOT)), span)
    return found


def test_the_commands_the_docs_name_exist_with_their_options():
    commands = _commands()
    assert len(commands) >= 20 and {"train", "plan", "simulate", "run"} <= {sub for _, sub, _ in commands}
    helps = _helps()
    for where, sub, rest in commands:
        assert sub in helps, f"{where}: `stagewise {sub}` is not a subcommand (stagewise --help: {sorted(helps)})"
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps[sub]))
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert option in options, f"{where}: `stagewise {sub}` has no option {option}"


def test_the_make_targets_the_docs_name_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {(b.where, t) for page in [*PAGES, ROOT / "README.md"] for b in blocks(page) if b.lang in SHELL
             for t in re.findall(r"^\s*make ([a-z][\w-]*)", b.code, re.M)}
    assert named
    for where, target in named:
        assert target in targets, f"{where}: `make {target}` is not a Makefile target"


# ---- the API pages (docs/api/, mkdocstrings) name every public name of the packages they document

API_PACKAGES = ["stagewise", "stagewise.schedules", "stagewise.partition", "stagewise.measure", "stagewise.models",
                "stagewise.data", "stagewise.deepspeed"]


def _public(package: str) -> list[str]:
    """The package's __all__, read without importing it."""
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(x, "id", None) == "__all__" for x in node.targets):
            return [name for name in ast.literal_eval(node.value) if not name.startswith("__")]
    raise AssertionError(f"{package} has no __all__")


def _documented() -> set[str]:
    """Dotted paths the `::: path` blocks of docs/api/ render: `path.NAME` for each of its `members:`, `path.*`
    for a block without a members list (everything public in it)."""
    found = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        for m in re.finditer(r"^::: (\S+)[ \t]*\n((?:[ \t]+\S.*\n?)*)", page.read_text(), re.M):
            members = re.search(r"^\s+members:\s*\n((?:\s+- .*\n?)+)", m.group(2), re.M)
            if members:
                found |= {f"{m.group(1)}.{x.strip()}" for x in re.findall(r"- (.+)", members.group(1))}
            else:
                found |= {m.group(1), m.group(1) + ".*"}
    return found


def test_the_api_pages_cover_every_public_name():
    documented = _documented()
    for package in API_PACKAGES:
        for name in _public(package):
            assert (f"{package}.{name}" in documented or f"{package}.*" in documented
                    or any(x.startswith(package + ".") and x.endswith("." + name) for x in documented)), \
                f"{package}.{name} is public (__all__) but no page in docs/api/ shows it: add it to a members list"


# ---- the benchmark page is generated, never typed


def test_the_benchmark_page_is_what_pages_py_writes_from_the_committed_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pages.py"), "--check"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
