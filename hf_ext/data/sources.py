"""Where a stage's rows come from: a verifiable task, a local data file, or a Hub dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from hf_ext.errors import UserInputError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN and Infinity; Arrow does not


def _parse(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=_no_constant)


def iter_json_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a local JSON data file, in the forms the datasets library reads: JSON lines (read
    line by line, blank lines skipped; `where` is "line N"), or a `.json` file holding an array of rows or a mapping of
    columns (read whole; `where` is "row N"). Numbers count from 1. Bad input is a one-line `UserInputError` naming the
    file and the line or row: text that is not UTF-8 or not JSON (NaN and Infinity included), or a row that is not an
    object. A UTF-8 byte-order mark at the start is allowed, as the datasets library allows it."""
    path = Path(path)
    if path.suffix == ".json":
        document = _read_json_document(path)
        if document is not None:
            yield from _rows_of_document(path, document)
            return
    yield from _read_json_lines(path)


def _read_json_document(path: Path) -> Any | None:
    """The whole `.json` file parsed as one JSON value, or None when it is JSON lines (more than one value)."""
    try:
        return _parse(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None  # the line-by-line reader names the line
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            return None
        raise UserInputError(
            f"{path}, line {error.lineno}: not valid JSON: {error.msg} (column {error.colno})") from None
    except ValueError as error:
        raise UserInputError(f"{path}: not valid JSON: {error}") from None
    except RecursionError:
        raise UserInputError(f"{path}: not valid JSON: nested too deeply") from None


def _rows_of_document(path: Path, document: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = sorted({len(v) for v in document.values()})
        if len(lengths) > 1:
            raise UserInputError(f"{path}: a mapping of columns needs columns of one length, got lengths {lengths}")
        document = [dict(zip(document, values)) for values in zip(*document.values())]
    elif isinstance(document, dict):
        document = [document]  # a file of one row
    if not isinstance(document, list):
        raise UserInputError(f"{path}: expected an array of rows, a mapping of columns, or one JSON object per line")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            raise UserInputError(f"{path}, row {number}: expected a JSON object (one row), got {type(row).__name__}")
        yield f"row {number}", row


def _read_json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, "rb") as handle:  # bytes, decoded line by line, so that a decoding error names its line
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UserInputError(f"{path}, line {number}: not UTF-8 text ({error.reason} at byte {error.start} of "
                                     "the line)") from None
            if not text.strip():
                continue
            try:
                row = _parse(text.rstrip("\r\n"))  # a column past the end names the line's end, not the next
            except json.JSONDecodeError as error:
                raise UserInputError(
                    f"{path}, line {number}: not valid JSON: {error.msg} (column {error.colno})") from None
            except ValueError as error:
                raise UserInputError(f"{path}, line {number}: not valid JSON: {error}") from None
            except RecursionError:
                raise UserInputError(f"{path}, line {number}: not valid JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise UserInputError(
                    f"{path}, line {number}: expected a JSON object (one row), got {type(row).__name__}")
            yield f"line {number}", row


def check_json_rows(path: str | Path) -> int:
    """Read a local JSON data file once, as a stream for JSON lines, before the datasets library does; the number of
    rows."""
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
