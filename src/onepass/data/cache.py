"""The on-disk cache of prepared data: one entry per (data files, tokenizer, template, options),
written atomically as `.npy` arrays that later runs and other ranks load memory-mapped."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import onepass
from onepass.data.chat_template import ChatTemplate
from onepass.data.stats import Stats
from onepass.data.types import Example, RenderOptions

ARRAYS = {"input_ids": np.int32, "loss_mask": np.int8, "turn": np.int32, "parent": np.int32}  # as cached


@dataclass
class PreparedData:
    examples: list[Example]
    stats: Stats
    cache_path: Path | None = None
    from_cache: bool = False
    rejects: list[dict[str, Any]] = field(default_factory=list)  # one row per skipped record, with its reason


def cache_key(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
              format_name: str | None, on_bad_record: str) -> str:
    """Everything that decides the tokens and masks: the data files' contents (and names within a
    directory; not where they live), the tokenizer, the template with its variables and stop texts
    (generation_config.json's stop tokens among them), the options, and the data stage's own code."""
    digest = hashlib.sha256()
    digest.update(data_stage_version().encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([template.variables, template.stop_texts]).encode() + template.source.encode())
    digest.update(json.dumps([asdict(options), format_name, on_bad_record]).encode())
    return digest.hexdigest()[:24]


@functools.lru_cache(maxsize=8)
def data_stage_version(package: Path = Path(__file__).parent) -> str:
    """A hash of the data stage's source (every module of `onepass/data`): a change to how records are
    read, rendered or masked is a new cache entry, whatever the package's version number says."""
    digest = hashlib.sha256(onepass.__version__.encode())
    for module in sorted(package.glob("*.py")):
        digest.update(module.name.encode() + module.read_bytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONEPASS_CACHE", Path.home() / ".cache" / "onepass"))


def save_cache(path: Path, data: PreparedData, inputs: Sequence[str | Path] = ()) -> None:
    """Write atomically: a temp dir renamed into place, so a killed run never leaves half a cache.
    `inputs`: the data paths as given, so a later run from a copy elsewhere can relocate the sources."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    np.save(temp / "lengths.npy", np.asarray([len(e) for e in data.examples], dtype=np.int64))
    np.save(temp / "tree.npy", np.asarray([e.is_tree for e in data.examples], dtype=bool))
    for name, dtype in ARRAYS.items():
        values = [e.parents if name == "parent" else getattr(e, name) for e in data.examples]
        np.save(temp / f"{name}.npy", (np.concatenate(values) if values else np.zeros(0)).astype(dtype))
    meta = {"stats": data.stats.to_dict(), "sources": [[e.source, e.where] for e in data.examples],
            "rejects": data.rejects, "inputs": [str(p) for p in inputs]}
    (temp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(temp, path)
    except OSError:  # another process (a rank on the same node) just wrote the same cache entry
        shutil.rmtree(temp, ignore_errors=True)
        if not is_cached(path):
            raise


def relocate(source: str, saved: Sequence[str], current: Sequence[str]) -> str:
    """`source` (a data file of the saved inputs, or a file inside one of their directories) under the
    current input in the same place of the list."""
    for old, new in zip(saved, current):
        if source == old:
            return new
        prefix = old.rstrip("/") + "/"
        if source.startswith(prefix):
            return str(Path(new) / source[len(prefix):])
    return source


def is_cached(path: Path) -> bool:
    return all((path / name).exists() for name in ("meta.json", "lengths.npy", "tree.npy",
                                                   *(f"{a}.npy" for a in ARRAYS)))


def load_cache(path: Path, inputs: Sequence[str | Path] = ()) -> PreparedData:
    """Examples as views into memory-mapped arrays: ranks on one machine share the pages, and each
    reads only the rows it trains on. With `inputs` (this run's data paths, the same files as the
    entry's, maybe elsewhere), each example's source names where its file is now."""
    meta = json.loads((path / "meta.json").read_text())
    if inputs and meta.get("inputs"):
        meta["sources"] = [[relocate(source, meta["inputs"], [str(p) for p in inputs]), where]
                           for source, where in meta["sources"]]
    bounds = np.concatenate([[0], np.cumsum(np.load(path / "lengths.npy"))])
    input_ids, loss_mask, turn, parent = (np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS)
    trees = np.load(path / "tree.npy")
    examples = [Example(input_ids[a:b], loss_mask[a:b], turn[a:b], source, where, parent[a:b] if tree else None)
                for (a, b), (source, where), tree in zip(zip(bounds[:-1], bounds[1:]), meta["sources"], trees)]
    return PreparedData(examples, Stats.from_dict(meta["stats"]), path, from_cache=True,
                        rejects=meta.get("rejects", []))
