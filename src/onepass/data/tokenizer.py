"""The tokenizer: a fast (Rust) one from a local directory, since rendering needs character offsets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepass.errors import OnepassError
from onepass.hub import local_or_hub


def load_tokenizer(path: str | Path) -> Any:
    """A fast tokenizer (needed for character offsets) from a local directory or a Hub id (onepass.hub)."""
    from transformers import AutoTokenizer

    path = local_or_hub(path, "model")
    if not path.is_dir():
        raise OnepassError(f"tokenizer directory not found: {path}. Fix: give a local Hugging Face model or "
                           "tokenizer directory, or a Hub id (org/name).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise OnepassError(f"{path}: could not load a tokenizer ({error}). Fix: the directory needs "
                           "tokenizer.json (or the files of a fast tokenizer).") from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise OnepassError(f"{path}: the tokenizer is not a fast (Rust) tokenizer, so it gives no character "
                           "offsets. Fix: save it with tokenizer.json (AutoTokenizer.from_pretrained(..., "
                           "use_fast=True).save_pretrained(...)).")
    return tokenizer
