"""onepass: supervised fine-tuning with one forward pass per conversation and exact loss masks.

From Python (see docs/python.md):

    import onepass
    data = onepass.prepare(dataset, tokenizer)
    result = onepass.fit(model, data, onepass.TrainOptions(max_steps=100), tokenizer=tokenizer)
    rows = onepass.logprobs(model, tokenizer, conversations)
    proof = onepass.check(model)

The names load on first use, so `import onepass` (and `onepass --help`) costs no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["prepare", "fit", "logprobs", "rank", "check", "TrainOptions", "DataOptions", "LoraOptions",
           "OnepassError"]


def __getattr__(name: str) -> Any:
    if name == "OnepassError":
        from onepass.errors import OnepassError

        return OnepassError
    if name in __all__:
        from onepass import api

        return getattr(api, name)
    raise AttributeError(f"module 'onepass' has no attribute {name!r}")
