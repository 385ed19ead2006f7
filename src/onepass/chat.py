"""`onepass chat`: talk to a model in the terminal with its own chat template.

History is kept across turns; generation stops at the template's end-of-turn token or EOS.
"""

from __future__ import annotations

from typing import Any

import torch


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


@torch.no_grad()
def reply(model: Any, tokenizer: Any, template: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
          temperature: float = 0.0, top_p: float = 1.0) -> str:
    prompt = template.render(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False).ids], device=device)
    stops = stop_token_ids(tokenizer, template)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            eos_token_id=stops, pad_token_id=stops[0] if stops else 0, **sampling)
    new = output[0, ids.shape[1]:].tolist()
    for position, token in enumerate(new):
        if token in stops:
            new = new[:position]
            break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def cmd_chat(args: Any) -> int:
    from onepass.chat_template import load_chat_template
    from onepass.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    template = load_chat_template(tokenizer, args.chat_template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device).to(device).eval()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompt is not None:
        print(reply(model, tokenizer, template, messages + [{"role": "user", "content": args.prompt}], **options))
        return 0
    print("onepass chat: type a message; an empty line or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return 0
        if not text:
            return 0
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, template, messages, **options)
        messages.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.set_defaults(handler=cmd_chat)
