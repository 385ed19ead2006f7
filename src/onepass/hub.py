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


def is_hub_id(name: str | Path) -> bool:
    return bool(HUB_ID.match(str(name))) and not Path(name).exists()


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
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
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
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if subset:
        files = [p for p in files if subset in p.relative_to(root).parts[:-1] or p.stem.startswith(subset)]
    wanted = split or "train"
    chosen = [p for p in files if _split_of(p.relative_to(root)) == wanted]
    if not chosen and split is None and len({_split_of(p.relative_to(root)) for p in files}) == 1:
        chosen = files  # a repo of one unnamed split
    if not chosen:
        found = sorted({_split_of(p.relative_to(root)) or "(unnamed)" for p in files}) or ["no data files"]
        raise OnepassError(f"{name}: no data files for split '{wanted}'{f' and subset {subset!r}' if subset else ''} "
                           f"(found: {', '.join(found)}). Fix: set split (and subset) in the data entry, e.g. "
                           f"{{path: {name}, split: {found[0]}}}.")
    return chosen


def _split_of(relative: Path) -> str | None:
    """The split a repo file belongs to, by the Hub's conventions: `train-00000-of-00001.parquet`,
    `data/test.jsonl`, `validation/0000.parquet`."""
    for part in (relative.stem, *reversed(relative.parts[:-1])):
        match = re.match(r"^(train|test|validation|valid|dev|eval)(?=$|[-_.])", part)
        if match:
            return match.group(1)
    return None
