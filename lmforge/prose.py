"""English prose that ships with every Python, for the masked-LM demo: no download.

Two sources, read in memory:

- ``pydoc_data.topics.topics``: the language reference's topic pages that ``help()`` shows (about 0.7 MB);
- the standard library's docstrings (modules, classes, functions), found with :mod:`ast` in the
  interpreter's own source files, test suites excluded (``data_prep.sources.stdlib_files``); the code is not run or imported.

Each topic page and each docstring of at least :data:`MIN_DOC_CHARS` characters is one document; exact
duplicates are kept once (prep drops them too, but the tokenizer should not see them twice).
"""
from __future__ import annotations

import ast
import inspect
import json
import logging
from pathlib import Path
from typing import Iterator

from data_prep.sources import stdlib_files
from lmforge_common import write_bytes_atomic

log = logging.getLogger("lmforge.prose")

MIN_DOC_CHARS = 200
"""Shortest docstring kept as a document (characters): one-liners are mostly not sentences."""
TEST_PARTS = {"test", "tests", "idle_test"}
"""Folders skipped: test suites' docstrings describe test cases, not the library (and are a third of the source)."""
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def topic_pages() -> Iterator[str]:
    """The ``help()`` topic pages of ``pydoc_data.topics`` (the language reference as plain text), sorted by topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_docstrings(min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Docstrings of at least ``min_chars`` characters of the stdlib's modules, classes and functions, cleaned
    with :func:`inspect.cleandoc`, in file order. Files that do not parse (test data, other Python versions)
    are skipped: they hold no docstring this interpreter would show."""
    for path in stdlib_files():
        if TEST_PARTS & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, DOC_NODES):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) >= min_chars:
                    yield inspect.cleandoc(doc)


def write_prose_corpus(path: str | Path, min_chars: int = MIN_DOC_CHARS) -> dict:
    """Write the topic pages and docstrings to ``path`` as jsonl (``{"text": ...}`` per line), atomically.

    Returns ``{"documents": n, "text_bytes": bytes of UTF-8 text}``.
    """
    seen: set[str] = set()
    lines: list[str] = []
    text_bytes = 0
    for doc in (*topic_pages(), *stdlib_docstrings(min_chars)):
        if doc and doc not in seen:
            seen.add(doc)
            lines.append(json.dumps({"text": doc}, ensure_ascii=False))
            text_bytes += len(doc.encode("utf-8"))
    write_bytes_atomic(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))
    return {"documents": len(lines), "text_bytes": text_bytes}
