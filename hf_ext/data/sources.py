"""Where a stage's rows come from: a verifiable task, a local data file, or a Hub dataset."""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict

from hf_ext.errors import UserInputError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


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
