"""`onepass demo --task tools`: a tiny model learns to call tools and to use their replies, on CPU.

Each conversation gives the model two functions (`get_weather(city)`, `convert(amount, from, to)`) as JSON
schemas; the user asks something only a call can answer, the model calls the function with arguments
taken from the user's words, the tool replies, and the model answers from the reply. Held out: exact match
of the call (name and arguments) and of the final answer, before and after training.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from onepass.demo.run import tiny_run_config, train_and_measure

log = logging.getLogger(__name__)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "integer"}, "from": {"type": "string"},
                                          "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}}]
CITIES = ("paris", "oslo", "rome", "lima", "cairo", "tokyo", "delhi", "quito")
WEATHER = ("sunny", "rainy", "cloudy", "snowy", "windy", "foggy")
CURRENCIES = ("eur", "usd", "gbp", "chf", "yen")
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def make_tool_dialogues(count: int, seed: int) -> list[dict[str, Any]]:
    """Requests whose right answer is a call, the tool's reply, and an answer that uses it."""
    rng = random.Random(seed)
    dialogues = []
    for _ in range(count):
        if rng.random() < 0.5:
            city, weather, degrees = rng.choice(CITIES), rng.choice(WEATHER), rng.randint(0, 9)
            ask, name, arguments = f"what is the weather in {city}?", "get_weather", {"city": city}
            result, answer = f"{weather}, {degrees} c", f"it is {weather} in {city}, {degrees} c."
        else:
            amount, (source, target) = rng.randint(1, 9), rng.sample(CURRENCIES, 2)
            value = rng.randint(1, 9)
            ask, name = f"how much is {amount} {source} in {target}?", "convert"
            arguments = {"amount": amount, "from": source, "to": target}
            result, answer = f"{value}", f"{amount} {source} is {value} {target}."
        dialogues.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "name": name, "content": result},
            {"role": "assistant", "content": answer}]})
    return dialogues


def parsed_call(text: str) -> dict[str, Any] | None:
    """The first `<tool_call>{...}</tool_call>` of a reply, as {"name", "arguments"}, or None."""
    match = CALL.search(text)
    try:
        call = json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return None
    return call if isinstance(call, dict) else None


def tool_accuracy(model: Any, tokenizer: Any, template: Any, dialogues: list[dict[str, Any]]) -> dict[str, float]:
    """Exact match of the call the model makes to the request, and of its answer given the tool's reply."""
    from onepass.score.chat import reply

    with_tools = template.for_conversation(tuple(TOOLS))
    calls = answers = 0
    for dialogue in dialogues:
        messages = dialogue["messages"]
        expected = messages[1]["tool_calls"][0]["function"]
        made = parsed_call(reply(model, tokenizer, with_tools, messages[:1], max_new_tokens=48))
        calls += made == {"name": expected["name"], "arguments": expected["arguments"]}
        answers += reply(model, tokenizer, with_tools, messages[:3], max_new_tokens=24) == messages[3]["content"]
    return {"calls": calls / len(dialogues), "answers": answers / len(dialogues)}


def run_tools_demo(output_dir: str | Path, steps: int = 800, num_train: int = 3000, num_eval: int = 60,
                   progress: bool = True, seed: int = 0) -> dict[str, Any]:
    output = Path(output_dir)
    started = time.perf_counter()
    train, held_out = make_tool_dialogues(num_train, seed=seed), make_tool_dialogues(num_eval, seed=seed + 1)
    # the tokenizer learns the words and numbers as one token each, and the calls' JSON in few tokens
    words = [" ".join([*CITIES, *WEATHER, *CURRENCIES, *map(str, range(100))])] * 50
    corpus = words + [json.dumps(tool) for tool in TOOLS] * 200 + [
        json.dumps(m["tool_calls"][0]["function"]) if m.get("tool_calls") else m["content"]
        for r in train[:500] for m in r["messages"]]
    config = tiny_run_config(output, train, held_out, corpus, steps, progress, vocab_size=1024)
    log.info(f"onepass demo --task tools: {num_train} tool-calling conversations (two functions given as JSON "
             "schemas), tiny Llama (4 layers, 128 wide), CPU")
    return train_and_measure(config, tool_accuracy, held_out, started)


def report_view(report: dict[str, Any], output: Path) -> list[Any]:
    """What `onepass demo --task tools` shows at the end (rich renderables)."""
    from rich.table import Table

    table = Table(title="held-out exact match: the call (name and arguments) and the answer from the tool's reply")
    for column in ("", "calls", "answers"):
        table.add_column(column, justify="right" if column else "left")
    for name in ("before", "after"):
        table.add_row(f"{name} training", f"{report[name]['calls']:.0%}", f"{report[name]['answers']:.0%}")
    return [table, f"held-out loss {report['eval_loss_before']:.3f} → {report['eval_loss_after']:.3f} "
                   f"in {report['steps']} steps, {report['seconds']} s",
            f"model:   {output / 'final'}\nmetrics: {output / 'metrics.jsonl'}\nreport:  {output / 'eval.json'}"]
