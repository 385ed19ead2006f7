"""`onepass chat`: talk to a model in the terminal with its own chat template.

History is kept across turns. Generation runs the model's own attention (`attention.own_attention`), so
its replies are the model's own `generate`'s, and stops at the tokens the trainer treats as the end
of a response: EOS, generation_config.json's stop tokens and the template's end-of-turn text.
"""

from __future__ import annotations

from typing import Any

import torch

from onepass.train.model import device_of, evaluating
from onepass.train.attention import own_attention


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    """The template's stop texts (EOS and generation_config.json's list, as `chat_template.stop_texts`
    found them) and the first token of the end-of-turn text the template writes after a response."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [tokenizer.convert_tokens_to_ids(text) for text in template.stop_texts]
    sentinel = "onepass-sentinel"
    try:
        rendered = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}])
        end_text = rendered[rendered.rindex(sentinel) + len(sentinel):].strip()
    except Exception:  # a template we cannot probe: the stop texts alone
        end_text = ""
    if end_text:
        ids.append(tokenizer.backend_tokenizer.encode(end_text, add_special_tokens=False).ids[0])
    unknown = tokenizer.unk_token_id
    return sorted({int(i) for i in ids if i is not None and i != unknown})


def reply(model: Any, tokenizer: Any, template: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
          temperature: float = 0.0, top_p: float = 1.0, streamer: Any = None, own: str | None = None) -> str:
    """The model's reply to `messages` (greedy when temperature is 0), cut at the end of its turn. A
    `streamer` (transformers' `TextStreamer`) is handed the tokens as they are generated; `own`: the
    attention the model came with, where known."""
    prompt = template.render(messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False).ids],
                       device=device_of(model))
    new = generate(model, ids, stop_token_ids(tokenizer, template), max_new_tokens, temperature, top_p, streamer,
                   own)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def generate(model: Any, ids: torch.Tensor, stops: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, streamer: Any = None, own: str | None = None) -> list[int]:
    """The new tokens the model generates after `ids` (1, T), through its own attention, up to (not
    including) the first stop token."""
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with own_attention(model, own), evaluating(model):
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0, streamer=streamer,
                                **sampling)
    new = output[0, ids.shape[1]:].tolist()
    for position, token in enumerate(new):
        if token in stops:
            return new[:position]
    return new


def terminal_streamer(tokenizer: Any) -> Any:
    """Prints a reply's text as it is generated (the prompt and special tokens left out)."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
