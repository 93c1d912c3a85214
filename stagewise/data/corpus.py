"""Text corpora: one built in (Python's standard library sources), a user's files, and SQuAD when reachable."""

from __future__ import annotations

import sysconfig
from os import PathLike
from pathlib import Path

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ".c", ".h")
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def builtin_corpus(include_tests: bool = False) -> list[str]:
    """The standard library's .py sources, one string per file, in sorted path order.

    Present wherever Python is, so training runs without a download: about 730 files / 11.5 MiB
    (CPython 3.11), or 1,790 files / 30 MiB with `include_tests` (the test suites).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and _TEST_DIRS.intersection(parts):
            continue
        files.append(path)
    # a few test files are deliberately not UTF-8; a replacement character is harmless for training
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def read_text_files(path: str | PathLike[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[str]:
    """One string per file: the file itself, or every file under a folder whose suffix is in `suffixes`."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    else:
        raise FileNotFoundError(f"no such file or folder: {root}")
    if not files:
        raise ValueError(f"no text files ({', '.join(suffixes)}) under {root}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def load_squad_contexts(split: str = "train") -> list[str]:
    """The distinct `context` paragraphs of SQuAD (as in the seed), in dataset order.

    Needs the `datasets` package and either network access to the Hugging Face Hub or a local
    HF cache holding SQuAD; otherwise raises RuntimeError saying so.
    """
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            "loading SQuAD needs the `datasets` package (pip install datasets); without it use the built-in "
            "corpus (builtin_corpus()) or your own text files (--data PATH)"
        ) from exc
    try:
        rows = datasets.load_dataset("squad", split=split)
    except Exception as exc:  # ConnectionError offline; others for a broken cache
        raise RuntimeError(
            f"could not load the SQuAD dataset ({type(exc).__name__}: {exc}). It needs network access to the "
            "Hugging Face Hub or a local HF datasets cache that holds it; otherwise use the built-in corpus "
            "(builtin_corpus()) or your own text files (--data PATH)"
        ) from exc
    return list(dict.fromkeys(str(c) for c in rows["context"]))  # each paragraph repeats once per question
