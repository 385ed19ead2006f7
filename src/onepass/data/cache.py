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

ARRAYS = {"input_ids": np.int32, "loss_mask": np.int8, "turn": np.int32, "parent": np.int32}  # per token, as cached
EXAMPLE_COLUMNS = {"length": np.int64, "tree": bool, "trained": np.int64, "source": np.int32, "where_length": np.int32}
CACHE_FORMAT = 2  # raw token files written chunk by chunk, per-example columns


@dataclass
class PreparedData:
    examples: Sequence[Example]  # a list, or the arrays of a cache entry (`CachedExamples`)
    stats: Stats
    cache_path: Path | None = None
    from_cache: bool = False
    rejects: list[dict[str, Any]] = field(default_factory=list)  # one row per skipped record, with its reason


def cache_key(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
              format_name: str | None, on_bad_record: str) -> str:
    """Everything that decides the tokens and masks: the data files' contents (and names within a
    directory; not where they live), the tokenizer, the template with its variables and stop texts
    (generation_config.json's stop tokens among them), the options, the data stage's own code and
    transformers' version."""
    import transformers  # its chat-template rendering (reasoning aliases, ...) decides the text too

    digest = hashlib.sha256()
    digest.update(data_stage_version().encode() + transformers.__version__.encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest.update(b"directory" if path.is_dir() else b"file")  # a folder of one file is not that file
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


class CacheWriter:
    """Writes a cache entry as examples arrive, chunk by chunk (memory does not grow with the data):
    each token array appended to its own raw file, per-example arrays kept small, and the whole
    renamed into place atomically by `finish`, so a killed run never leaves half an entry."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        self._files = {name: open(self.temp / f"{name}.bin", "wb") for name in ARRAYS}
        self._where = open(self.temp / "where.bin", "wb")
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in EXAMPLE_COLUMNS}
        self._sources: dict[str, int] = {}

    def add(self, examples: Sequence[Example]) -> None:
        if not examples:
            return
        for name, dtype in ARRAYS.items():
            values = [e.parents if name == "parent" else getattr(e, name) for e in examples]
            np.concatenate(values).astype(dtype).tofile(self._files[name])
        wheres = [e.where.encode() for e in examples]
        self._where.write(b"".join(wheres))
        columns = {"length": [len(e) for e in examples], "tree": [e.is_tree for e in examples],
                   "trained": [e.num_trained_tokens for e in examples], "where_length": [len(w) for w in wheres],
                   "source": [self._sources.setdefault(e.source, len(self._sources)) for e in examples]}
        for name, values in columns.items():
            self._columns[name].append(np.asarray(values, dtype=EXAMPLE_COLUMNS[name]))

    def finish(self, stats: Stats, rejects: list[dict[str, Any]], inputs: Sequence[str | Path] = ()) -> None:
        for handle in (*self._files.values(), self._where):
            handle.close()
        for name, dtype in EXAMPLE_COLUMNS.items():
            parts = self._columns[name]
            np.save(self.temp / f"{name}.npy", np.concatenate(parts) if parts else np.zeros(0, dtype))
        meta = {"stats": stats.to_dict(), "sources": list(self._sources), "rejects": rejects,
                "inputs": [str(p) for p in inputs], "format": CACHE_FORMAT}
        (self.temp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.replace(self.temp, self.path)
        except OSError:  # another process (a rank on the same node) just wrote the same cache entry
            shutil.rmtree(self.temp, ignore_errors=True)
            if not is_cached(self.path):
                raise

    def abort(self) -> None:
        for handle in (*self._files.values(), self._where):
            handle.close()
        shutil.rmtree(self.temp, ignore_errors=True)


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
    """A complete entry of this format (an older entry has none of its token files: it is prepared again)."""
    return all((path / name).exists() for name in ("meta.json", "where.bin", *(f"{a}.bin" for a in ARRAYS),
                                                   *(f"{c}.npy" for c in EXAMPLE_COLUMNS)))


def load_cache(path: Path, inputs: Sequence[str | Path] = ()) -> PreparedData:
    """The entry's examples as slices of memory-mapped arrays (`CachedExamples`: no per-example objects
    until one is used): ranks on one machine share the pages, and each reads only the rows it trains
    on. With `inputs` (this run's data paths, the same files as the entry's, maybe elsewhere), each
    example's source names where its file is now."""
    meta = json.loads((path / "meta.json").read_text())
    sources = meta["sources"]
    if inputs and meta.get("inputs"):
        sources = [relocate(source, meta["inputs"], [str(p) for p in inputs]) for source in sources]
    examples = CachedExamples(path, sources)
    return PreparedData(examples, Stats.from_dict(meta["stats"]), path, from_cache=True,
                        rejects=meta.get("rejects", []))


def _mapped(file: Path, dtype: Any) -> np.ndarray:
    return np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.zeros(0, dtype)


class CachedExamples(Sequence):
    """The examples of a cache entry, as arrays: `lengths`, `trees`, `trained` (trained tokens) and
    `source_ids` per example for whole-dataset work (planning, mixtures), and an `Example` (views into
    the memory-mapped token arrays) made only when one is asked for."""

    def __init__(self, path: Path, sources: list[str]):
        self.lengths = np.load(path / "length.npy")
        self.trees = np.load(path / "tree.npy")
        self.trained = np.load(path / "trained.npy")
        self.source_ids = np.load(path / "source.npy")
        self.sources = sources
        self.bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        self._where_bounds = np.concatenate([[0], np.cumsum(np.load(path / "where_length.npy"))])
        self._arrays = {name: _mapped(path / f"{name}.bin", dtype) for name, dtype in ARRAYS.items()}
        self._where = _mapped(path / "where.bin", np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        a, b = int(self.bounds[index]), int(self.bounds[index + 1])
        arrays = {name: array[a:b] for name, array in self._arrays.items()}
        w0, w1 = int(self._where_bounds[index]), int(self._where_bounds[index + 1])
        return Example(arrays["input_ids"], arrays["loss_mask"], arrays["turn"],
                       self.sources[int(self.source_ids[index])], bytes(self._where[w0:w1]).decode(),
                       arrays["parent"] if self.trees[index] else None)
