"""Where a stage's rows come from: a verifiable task, a local data file, or a Hub dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from hf_ext.errors import UserInputError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _kind(value: Any) -> str | None:
    """The column type a JSON value gives in Arrow (numbers are one kind: Arrow widens int to float), None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def iter_json_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a JSON-lines file (blank lines skipped; read as a stream) or of a `.json` file
    holding one array of rows (read whole); `where` is "line N" (1-based) or, in an array, "row N" (1-based). Bad input is a
    one-line `UserInputError` naming the file and the line or row: text that is not JSON, a row that is not an object, or a key whose type differs from the row where it first
    appeared (the datasets library cannot hold such a column)."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        try:
            start = handle.read(4096).lstrip()[:1]
        except UnicodeDecodeError as error:
            raise UserInputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        handle.seek(0)
        if path.suffix == ".json" and start == "[":
            unit, rows = "row", _read_json_array(path, handle.read())
        else:
            unit, rows = "line", _read_json_lines(path, handle)
        first_seen: dict[str, tuple[str, int]] = {}
        for number, row in rows:
            if not isinstance(row, dict):
                raise UserInputError(f"{path}, {unit} {number}: expected a JSON object (one row), got {type(row).__name__}")
            for key, value in row.items():
                kind = _kind(value)
                if kind is None:
                    continue
                seen = first_seen.setdefault(key, (kind, number))
                if seen[0] != kind:
                    raise UserInputError(f"{path}, {unit} {number}: key {key!r} is a {kind} here, a {seen[0]} at {unit} "
                                         f"{seen[1]}; every row must give a key the same type")
            yield f"{unit} {number}", row


def _read_json_lines(path: Path, handle) -> Iterator[tuple[int, Any]]:
    line = 0
    try:
        for line, text in enumerate(handle, start=1):
            if text.strip():
                yield line, json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path}, line {line}: not valid JSON: {error.msg} (column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path}, line {line + 1}: not UTF-8 text ({error.reason})") from None


def _read_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path}, line {error.lineno}: not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(rows, list):
        raise UserInputError(f"{path}, line 1: expected an array of rows or one JSON object per line")
    yield from enumerate(rows, start=1)


def check_json_rows(path: str | Path) -> int:
    """Read a local JSON(-lines) data file once, as a stream, before the datasets library does; the number of rows."""
    return sum(1 for _ in iter_json_rows(path))


def describe_source(script_args) -> str:
    return f"task {script_args.task}" if script_args.task else str(script_args.dataset_name)


def load_splits(script_args, seed: int) -> DatasetDict:
    """`train` (and `test` when there is one) rows for the recipe's `task` (split by `task_seed`, else `seed`) or
    `dataset_name`."""
    if script_args.task:
        from hf_ext.data.tasks import TASKS

        split_seed = seed if script_args.task_seed is None else script_args.task_seed
        return TASKS[script_args.task].splits(script_args.task_train_size, script_args.task_eval_size, split_seed)

    import datasets

    name = script_args.dataset_name
    path = Path(name)
    if path.is_file() and path.stat().st_size == 0:
        raise UserInputError(f"dataset {name}: the file is empty")
    if path.is_file() and not script_args.allow_unverified_data:
        from hf_ext.data.manifest import verify_manifest

        verify_manifest(path)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        check_json_rows(path)
    try:
        if path.suffix in _BUILDERS and path.is_file():
            loaded = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path))
        elif path.is_dir() and (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            if not script_args.allow_unverified_data:
                raise UserInputError(
                    f"dataset {name}: a Hub dataset has no QC manifest; set allow_unverified_data: true to train on it "
                    f"as it is, or save it to a .jsonl file and vet it with `hf-ext data manifest FILE`"
                )
            loaded = datasets.load_dataset(name, script_args.dataset_config)
    except (FileNotFoundError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"dataset {name}: could not be loaded: {first_line}") from None
    except Exception as error:  # datasets' JSON/CSV parse errors have no common base class
        raise UserInputError(f"dataset {name}: not readable as {path.suffix or 'a dataset'}: {type(error).__name__}: {str(error)[:200]}") from None

    splits = {"train": script_args.dataset_train_split, "test": script_args.dataset_test_split}
    if splits["train"] not in loaded:
        raise UserInputError(f"dataset {name}: no split {splits['train']!r} (has: {', '.join(loaded)})")
    return DatasetDict({key: loaded[split] for key, split in splits.items() if split in loaded})
