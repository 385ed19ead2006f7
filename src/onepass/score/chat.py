"""`onepass chat`: talk to a model in the terminal with its own chat template.

History is kept across turns; generation stops at the template's end-of-turn token or EOS.
"""

from __future__ import annotations

from typing import Any

import torch

from onepass.train.model import device_of, evaluating


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    """EOS plus the first token of the end-of-turn text the template writes after a response."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sentinel = "onepass-sentinel"
    try:
        rendered = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}])
        end_text = rendered[rendered.rindex(sentinel) + len(sentinel):].strip()
    except Exception:  # a template we cannot probe: EOS alone
        end_text = ""
    if end_text:
        ids.append(tokenizer.backend_tokenizer.encode(end_text, add_special_tokens=False).ids[0])
    return sorted(set(ids))


def reply(model: Any, tokenizer: Any, template: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
          temperature: float = 0.0, top_p: float = 1.0) -> str:
    """The model's reply to `messages` (greedy when temperature is 0), cut at the end of its turn."""
    prompt = template.render(messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False).ids],
                       device=device_of(model))
    stops = stop_token_ids(tokenizer, template)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with evaluating(model):
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                eos_token_id=stops, pad_token_id=stops[0] if stops else 0, **sampling)
    new = output[0, ids.shape[1]:].tolist()
    for position, token in enumerate(new):
        if token in stops:
            new = new[:position]
            break
    return tokenizer.decode(new, skip_special_tokens=True).strip()
