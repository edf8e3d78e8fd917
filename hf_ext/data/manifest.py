"""QC manifests: the record that a data file was produced (or vetted) by hf_ext and has not changed since.

`<file>.manifest.json` next to `<file>` holds the file's sha256 and row count, QC metrics, the generator and its
version, the source model, the git commit of the code that wrote it and the time it was written. Training stages
refuse a local data file whose manifest is missing or does not match the file, unless the recipe opts out with
`allow_unverified_data: true`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from hf_ext.errors import UserInputError
from hf_ext.run_folder import write_json_atomic, write_text_atomic

MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(data_path: str | Path) -> Path:
    data_path = Path(data_path)
    return data_path.with_name(data_path.name + MANIFEST_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_rows(path: str | Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(
    data_path: str | Path,
    generator: str,
    qc: dict[str, Any],
    source_model: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe the finished JSONL file `data_path`; written atomically after the data, so its presence means done."""
    from hf_ext import __version__

    manifest = {
        "file": Path(data_path).name,
        "sha256": file_sha256(data_path),
        "rows": count_rows(data_path),
        "generator": generator,
        "hf_ext_version": __version__,
        "git_commit": _git_commit(),
        "source_model": source_model,
        "parameters": parameters or {},
        "qc": qc,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(manifest_path(data_path), manifest)
    return manifest


def verify_manifest(data_path: str | Path) -> dict[str, Any]:
    """The manifest of `data_path`, or a clear error if there is none or it does not describe this file."""
    how = (
        f"produce the file with `hf-ext data ...`, or vet a file of your own with `hf-ext data manifest {data_path}`, "
        "or set `allow_unverified_data: true` in the recipe"
    )
    path = manifest_path(data_path)
    if not path.is_file():
        raise UserInputError(f"{data_path}: no QC manifest ({path.name}); {how}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path}: not valid JSON ({error}); {how}") from None
    actual = file_sha256(data_path)
    if manifest.get("sha256") != actual:
        raise UserInputError(
            f"{data_path}: changed since its manifest was written (sha256 {actual[:12]}..., manifest says "
            f"{str(manifest.get('sha256'))[:12]}...); {how}"
        )
    rows = count_rows(data_path)
    if manifest.get("rows") != rows:
        raise UserInputError(f"{data_path}: has {rows} rows, its manifest says {manifest.get('rows')}; {how}")
    return manifest


def write_data_file(
    data_path: str | Path,
    rows: list[dict[str, Any]],
    generator: str,
    qc: dict[str, Any],
    source_model: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `rows` as JSONL atomically, then its manifest: a reader never sees a half-written data file."""
    data_path = Path(data_path)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(data_path, "".join(json.dumps(row) + "\n" for row in rows))
    return write_manifest(data_path, generator, qc, source_model=source_model, parameters=parameters)


def vet_file(path: str | Path) -> dict[str, Any]:
    """`hf-ext data manifest`: validate every row of a user's .jsonl file (SFT rows or preference pairs), reading it
    as a stream, and write its manifest, which is returned. The format is told from the first row."""
    from hf_ext.data.formats import detect_format
    from hf_ext.data.pairs import validate_pair
    from hf_ext.data.sources import iter_json_rows

    if not Path(path).is_file():
        raise UserInputError(f"{path}: file does not exist")
    is_pairs, data_format, count = False, None, 0
    for where, row in iter_json_rows(path):
        if count == 0:
            is_pairs = {"prompt", "chosen", "rejected"} <= set(row)
            data_format = None if is_pairs else detect_format(list(row), "auto", f"{path}, {where}")
        problem = validate_pair(row) if is_pairs else data_format.validate(row)
        if problem:
            raise UserInputError(f"{path}, {where}: {problem}")
        count += 1
    if count == 0:
        raise UserInputError(f"{path}: no rows (the file is empty)")
    qc = {"kind": "pairs" if is_pairs else f"sft ({data_format.name})", "rows_validated": count}
    return write_manifest(path, generator="hf-ext data manifest (user-provided file)", qc=qc)


def partial_path(output: str | Path) -> Path:
    """Where a data tool keeps the attempts of an unfinished `output`: `<output>.partial`."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def read_partial(path: Path) -> list[dict]:
    """Complete lines of a partial file; a line cut by a crash is dropped (and redone)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def resumable_attempts(output: str | Path, count: int, batch_size: int, attempt_batch, matches=None) -> list[dict]:
    """The rows of `count` attempts (each a dict with its `index`), in order. Those an interrupted run left in
    `<output>.partial` are read back (unless `matches(row)` says the row was made for another input: it is redone);
    the others are made by `attempt_batch(indices, start, to_do)` (`start`: how many of the `to_do` attempts came
    before), a batch at a time, and appended to the partial file, which is flushed to disk after every batch. The caller writes the final
    file and its manifest, then deletes the partial file, so a partial file is never trained on."""
    partial = partial_path(output)
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {row["index"]: row for row in read_partial(partial)
            if row["index"] < count and (matches is None or matches(row))}
    todo = [i for i in range(count) if i not in done]
    with open(partial, "a") as handle:
        for start in range(0, len(todo), batch_size):
            for row in attempt_batch(todo[start : start + batch_size], start, len(todo)):
                handle.write(json.dumps(row) + "\n")
                done[row["index"]] = row
            handle.flush()
            os.fsync(handle.fileno())
    return [done[i] for i in range(count)]
