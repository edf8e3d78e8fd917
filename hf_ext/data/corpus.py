"""Real English text corpora that exist offline, for tokenizer training and small-LM pretraining.

The one source, ``python_docs``, is the documentation every CPython install carries:

- every topic of ``pydoc_data.topics.topics`` (the Language Reference sections behind ``help("assert")``),
  one document per topic;
- the docstrings of the standard library: each ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` is parsed with
  ``ast`` (tests, ``idlelib``, ``lib2to3`` and ``site-packages`` are left out, as is any file that does not
  parse), and one document per module joins the module docstring and its class/function docstrings, in source
  order, with blank lines. Modules with less than 200 characters of docstrings are skipped.

Documents are split whole, by a SHA-256 hash of their name (``topic:NAME`` or ``module:relative/path.py``), so
validation text is held out from training and the split does not depend on the order or number of documents.
The sizes depend on the Python install; on CPython 3.11.7 with the default 5% validation (78 distinct topics and
381 modules, parsed in 2-4 seconds, once per process):

    train:      433 documents, 1,978,426 characters
    validation:  26 documents,   115,484 characters
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict

from hf_ext.errors import UserInputError

MIN_DOCUMENT_CHARS = 200
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"})
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK_FIELDS = frozenset({"body", "orelse", "finalbody", "handlers", "cases"})


def pydoc_topic_documents() -> list[tuple[str, str]]:
    """``(name, text)`` for every topic of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"topic:{name}", topics[name]) for name in sorted(topics)]


def stdlib_docstring_documents(min_chars: int = MIN_DOCUMENT_CHARS) -> list[tuple[str, str]]:
    """``(name, text)`` for every standard library module with at least ``min_chars`` of docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in _stdlib_sources(root):
        relative = path.relative_to(root)
        text = _module_docstrings(path)
        if text is not None and len(text) >= min_chars:
            documents.append((f"module:{relative.as_posix()}", text))
    return documents


def _stdlib_sources(root: Path) -> list[Path]:
    """Sorted ``*.py`` files under ``root``, not descending into excluded directories (site-packages is large)."""
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in _EXCLUDED_DIRS]
        paths.extend(Path(directory, name) for name in files if name.endswith(".py"))
    return sorted(paths)


def _module_docstrings(path: Path) -> str | None:
    """The module's docstrings joined by blank lines, or None when the file does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules' string literals
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    docstrings = []

    # Only statement blocks can hold a class or function; skipping expressions makes this several times faster.
    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOCUMENTED_NODES):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and docstring.strip():
                docstrings.append(docstring.strip())
        for field in node._fields:
            if field in _BLOCK_FIELDS:
                for child in getattr(node, field):
                    visit(child)

    visit(tree)
    return "\n\n".join(docstrings)


def python_docs_documents() -> list[tuple[str, str]]:
    """All ``python_docs`` documents as ``(name, text)``: pydoc topics first, then stdlib modules.

    A text seen before under another name is dropped (the ``if`` and ``else`` topics are the same page), so the
    same text can never land in both splits.
    """
    return list(_python_docs_documents())


@functools.cache  # parsing the standard library takes seconds and its files do not change while we run
def _python_docs_documents() -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    documents = []
    for name, text in pydoc_topic_documents() + stdlib_docstring_documents():
        if text not in seen:
            seen.add(text)
            documents.append((name, text))
    return tuple(documents)


SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {"python_docs": python_docs_documents}


def is_validation_document(name: str, validation_fraction: float) -> bool:
    """Whether the document called ``name`` belongs to the validation split (a stable hash of the name)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def load_text_corpus(source: str = "python_docs", validation_fraction: float = 0.05) -> DatasetDict:
    """``train`` and ``validation`` splits of ``source``, one row per document in a single ``text`` column.

    Deterministic for a given Python install; documents are never cut across splits.
    """
    if source not in SOURCES:
        raise UserInputError(f"unknown text corpus source {source!r}; known sources: {', '.join(sorted(SOURCES))}")
    if not 0.0 < validation_fraction < 1.0:
        raise UserInputError(f"validation_fraction must be strictly between 0 and 1, got {validation_fraction}")
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for name, text in SOURCES[source]():
        splits["validation" if is_validation_document(name, validation_fraction) else "train"].append(text)
    return DatasetDict({split: Dataset.from_dict({"text": texts}) for split, texts in splits.items()})
