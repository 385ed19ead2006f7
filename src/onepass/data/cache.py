"""The on-disk cache of prepared data: one entry per (data files, tokenizer, template, options),
written atomically as `.npy` arrays that later runs and other ranks load memory-mapped."""

from __future__ import annotations

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
    digest = hashlib.sha256()
    digest.update(onepass.__version__.encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.name).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(template.variables).encode() + template.source.encode())
    digest.update(json.dumps([asdict(options), format_name, on_bad_record]).encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONEPASS_CACHE", Path.home() / ".cache" / "onepass"))


def save_cache(path: Path, data: PreparedData) -> None:
    """Write atomically: a temp dir renamed into place, so a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    np.save(temp / "lengths.npy", np.asarray([len(e) for e in data.examples], dtype=np.int64))
    np.save(temp / "tree.npy", np.asarray([e.is_tree for e in data.examples], dtype=bool))
    for name, dtype in ARRAYS.items():
        values = [e.parents if name == "parent" else getattr(e, name) for e in data.examples]
        np.save(temp / f"{name}.npy", (np.concatenate(values) if values else np.zeros(0)).astype(dtype))
    meta = {"stats": data.stats.to_dict(), "sources": [[e.source, e.where] for e in data.examples],
            "rejects": data.rejects}
    (temp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(temp, path)
    except OSError:  # another process (a rank on the same node) just wrote the same cache entry
        shutil.rmtree(temp, ignore_errors=True)
        if not is_cached(path):
            raise


def is_cached(path: Path) -> bool:
    return all((path / name).exists() for name in ("meta.json", "lengths.npy", "tree.npy",
                                                   *(f"{a}.npy" for a in ARRAYS)))


def load_cache(path: Path) -> PreparedData:
    """Examples as views into memory-mapped arrays: ranks on one machine share the pages, and each
    reads only the rows it trains on."""
    meta = json.loads((path / "meta.json").read_text())
    bounds = np.concatenate([[0], np.cumsum(np.load(path / "lengths.npy"))])
    input_ids, loss_mask, turn, parent = (np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS)
    trees = np.load(path / "tree.npy")
    examples = [Example(input_ids[a:b], loss_mask[a:b], turn[a:b], source, where, parent[a:b] if tree else None)
                for (a, b), (source, where), tree in zip(zip(bounds[:-1], bounds[1:]), meta["sources"], trees)]
    return PreparedData(examples, Stats.from_dict(meta["stats"]), path, from_cache=True,
                        rejects=meta.get("rejects", []))
