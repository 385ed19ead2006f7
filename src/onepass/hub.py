"""Hugging Face Hub ids wherever a model, tokenizer or data path is given: `Qwen/Qwen3-0.6B`,
`HuggingFaceTB/smoltalk`. A path that exists is used as it is; otherwise a name of the form `org/name` is
fetched with `huggingface_hub.snapshot_download` into the Hub cache, or found there offline
(`HF_HUB_OFFLINE=1`, as `hf download` leaves it). A dataset repo's files are read by the same readers
as local files: its parquet / jsonl / json / csv files of one split (and subset)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from onepass.errors import OnepassError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
RepoType = Literal["model", "dataset"]
# what a model repo may hold beside the transformers checkpoint: the original framework's copy of the
# weights (Llama's original/), other runtimes' formats
MODEL_EXTRAS = ["original/*", "*.gguf", "onnx/*", "*.onnx", "*.msgpack", "*.h5", "*.ot", "*.mlpackage/*"]
METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")


def is_hub_id(name: str | Path) -> bool:
    """`org/name`, not a path that exists, and not a mistyped data file (`data/train.jsonl`)."""
    text = str(name)
    return bool(HUB_ID.match(text)) and not Path(text).exists() and not text.lower().endswith(DATA_SUFFIXES)


def local_or_hub(name: str | Path, repo_type: RepoType = "model", revision: str | None = None) -> Path:
    """`name` as a local path when it exists (or is no Hub id: the caller's not-found error speaks),
    else the local snapshot of the Hub repo `name` at `revision`."""
    if not is_hub_id(name):
        return Path(name)
    from huggingface_hub import constants, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        constants.HF_HUB_OFFLINE
    try:
        folder = snapshot_download(str(name), repo_type=repo_type, revision=revision, local_files_only=offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                   ignore_patterns=MODEL_EXTRAS if repo_type == "model" else None)
    except Exception as error:  # noqa: BLE001 - not found, no network, offline and not cached: one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" at revision {revision}" if revision else ""
        kind = "dataset" if repo_type == "dataset" else "model"
        raise OnepassError(f"{name!s}: not a local path, and the Hugging Face Hub {kind} {name!s}{where} could not be "
                           f"found or fetched ({type(error).__name__}: {message[:200]}). Fix: check the path or the id; "
                           f"offline, download it first (hf download {name}"
                           f"{' --repo-type dataset' if repo_type == 'dataset' else ''}).") from None
    return Path(folder)


def dataset_files(name: str | Path, split: str | None = None, subset: str | None = None,
                  revision: str | None = None) -> list[Path]:
    """The files a data entry names: a local path as it is, or a Hub dataset's data files of `split`
    (default: train) and `subset` (a folder or file-name part of the repo), in name order."""
    if not is_hub_id(name):
        return [Path(name)]
    root = local_or_hub(name, "dataset", revision)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and p.name not in METADATA)
    if subset:
        files = [p for p in files if subset in p.relative_to(root).parts[:-1] or p.stem.startswith(subset)]
    wanted = split or "train"
    chosen = [p for p in files if _split_of(p.relative_to(root)) == wanted]
    if not chosen and split is None and {_split_of(p.relative_to(root)) for p in files} == {None}:
        chosen = files  # a repo of files with no split in their names: all of it
    if not chosen:
        found = sorted({_split_of(p.relative_to(root)) or "(unnamed)" for p in files}) or ["no data files"]
        raise OnepassError(f"{name}: no data files for split '{wanted}'{f' and subset {subset!r}' if subset else ''} "
                           f"(found: {', '.join(found)}). Fix: set split (and subset) in the data entry, e.g. "
                           f"{{path: {name}, split: {found[0]}}}.")
    folders = sorted({_subset_of(p.relative_to(root)) for p in chosen})
    if not subset and len(folders) > 1:
        raise OnepassError(f"{name}: split '{wanted}' has files in several subsets ({', '.join(folders)}), which may "
                           f"hold the same records. Fix: name one, e.g. {{path: {name}, subset: {folders[0]}}}.")
    return chosen


def _subset_of(relative: Path) -> str:
    """The folder a data file sits in, below the conventional `data/` (a subset's files share one)."""
    parts = [part for part in relative.parts[:-1] if part != "data"]
    if parts and _stem_split(parts[-1]) == parts[-1] and _split_of(relative) == parts[-1]:
        parts = parts[:-1]  # `validation/0000.parquet`: the folder is the split, not a subset
    return "/".join(parts) or "(top)"


def _split_of(relative: Path) -> str | None:
    """The split a repo file belongs to, by the Hub's conventions: its name less the shard suffix
    (`train_sft-00000-of-00003.parquet` → train_sft, `data/test.jsonl` → test), or its folder when the
    name is only a shard number (`validation/0000.parquet`); None for a file named otherwise."""
    stem = _stem_split(relative.stem)
    if stem.isdigit() or not stem:
        folders = [part for part in relative.parts[:-1] if part != "data"]
        return folders[-1] if folders else None
    return stem if re.match(SPLIT_NAME, stem) else None


def _stem_split(stem: str) -> str:
    return re.sub(r"-\d+-of-\d+$", "", stem)


SPLIT_NAME = r"^(train|test|validation|valid|dev|eval)([_-][\w-]*)?$"
