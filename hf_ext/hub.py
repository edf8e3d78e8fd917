"""Push a finished run to the Hugging Face Hub with hf_ext's card, and render that card locally.

    hf-ext push OUTPUT_DIR --repo-id user/name [--private] [--revision BRANCH] [--commit-message TEXT]
    hf-ext card OUTPUT_DIR [--repo-id user/name]

or `push_to_hub: true` in a recipe (with `hub_model_id`, `hub_private_repo`, `hub_revision`), which pushes once at
the end of the run. transformers' `Trainer.push_to_hub` is not used: it replaces README.md with a generic card
(dropping `library_name: peft`, `base_model` and the tags) and pushes checkpoints with their in-progress card.

What is pushed, in one commit (a push that fails leaves the repository as it was): the model or adapter, the
tokenizer, `recipe.yaml`, `metrics.json`, the plots and other run files, and a README.md rendered again by the one
card renderer (`hf_ext.model_card`) with the repo id in its usage snippets. Checkpoint folders (resumption state) and
pickle files are left out. Every check runs before the first request: a folder without a finished model, an invalid
repo id or a missing token is one error line.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from hf_ext.errors import UserInputError
from hf_ext.run_folder import RunFolder

logger = logging.getLogger("hf_ext")

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
LEFT_OUT = ("checkpoint-*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", ".*", "__pycache__", "*.lock")


def render_run_card(output_dir: str | Path, model_id: str | None = None):
    """The card of the finished run in `output_dir`, from its `recipe.yaml` and `metrics.json` alone; `model_id` is
    the name its usage snippets load (default: the folder's name)."""
    from hf_ext.recipe import parse_recipe
    from hf_ext.trainers import get_stage

    folder = RunFolder(output_dir)
    if not folder.has_recipe():
        raise UserInputError(f"{folder.path}: no recipe.yaml (not a folder written by hf-ext train)")
    metrics = folder.read_metrics()
    if "model_summary" not in metrics:
        raise UserInputError(
            f"{folder.file('metrics.json')}: no key 'model_summary' (written by hf_ext 0.x before cards could be "
            "rendered from the folder); train the run again to push it with its card"
        )
    # read as saved: no path checks (data may have moved), and a GPU run's bf16 must not fail on this CPU
    recipe = parse_recipe(folder.file("recipe.yaml"), ["--use_cpu", "true"], check_paths=False)
    return get_stage(recipe.stage).render_card(recipe, metrics, metrics["model_summary"], model_id)


def pushed_files(output_dir: Path) -> list[Path]:
    """The files of a run folder that go to the Hub (relative paths), without README.md (rendered at push)."""
    files = []
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir)
        if path.is_dir() or relative.as_posix() == "README.md":
            continue
        if any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in LEFT_OUT):
            continue
        files.append(relative)
    return files


def check_push_target(repo_id: str, token: str | None, key: str = "--repo-id") -> str:
    """The token to push to `repo_id` with, after the checks that need no network (repo id, token, offline mode);
    a UserInputError naming `key` otherwise."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserInputError(f"{key} {repo_id!r}: {str(error).splitlines()[0]}") from None
    if constants.HF_HUB_OFFLINE:
        raise UserInputError("cannot push with HF_HUB_OFFLINE=1 set (unset it to reach the Hub)")
    token = token or get_token()
    if not token:
        raise UserInputError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)")
    return token


def check_pushable(output_dir: Path, repo_id: str, token: str | None) -> str:
    """The token to push with, after every check that needs no network; a UserInputError naming what is wrong."""
    if not output_dir.is_dir():
        raise UserInputError(f"{output_dir}: no such folder")
    if not any((output_dir / name).is_file() for name in MODEL_FILES):
        raise UserInputError(f"{output_dir}: no model or adapter to push (expected one of {', '.join(MODEL_FILES)})")
    RunFolder(output_dir).read_metrics()  # a run that did not finish has no metrics.json
    return check_push_target(repo_id, token)


def push_run(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Push the finished run in `output_dir` to `repo_id` (created if needed) in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        from httpx2 import HTTPError as TransportError  # huggingface_hub 2.x's HTTP client: timeouts, refused connections
    except ImportError:
        TransportError = OSError

    output_dir = Path(output_dir)
    token = check_pushable(output_dir, repo_id, token)
    card = render_run_card(output_dir, repo_id)
    files = pushed_files(output_dir)
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private and not api.repo_info(repo_id).private:
            raise UserInputError(f"--private: {repo_id} already exists and is public (change it on the Hub first)")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=output_dir / f) for f in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        # the repository holds this run only: an earlier push's weights, shards or plots would be loaded or shown
        pushed = {op.path_in_repo for op in operations}
        stale = [p for p in api.list_repo_files(repo_id, revision=revision) if p not in pushed and p != ".gitattributes"]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        stage = RunFolder(output_dir).read_recipe().get("stage")
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or f"hf_ext: {stage} run {output_dir.name}",
            revision=revision,
        )
    except (HfHubHTTPError, TransportError, ConnectionError) as error:  # never includes the request headers
        raise UserInputError(
            f"push to {repo_id} failed ({str(error).splitlines()[0]}); nothing was committed, the run is intact: "
            f"retry with `hf-ext push {output_dir} --repo-id {repo_id}`"
        ) from None
    logger.info("pushed %d files of %s to %s (%d stale files removed)", len(files) + 1, output_dir, commit.commit_url,
                len(stale))
    return commit.commit_url
