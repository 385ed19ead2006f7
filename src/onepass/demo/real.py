"""`onepass demo --real` (`make demo-real`): the real SmolLM2-135M-Instruct fine-tuned on this CPU in a
few minutes (LoRA; bf16 autocast where the CPU has it), with a change a person can see.

The objective is a sum over every trained token of the dataset, so a habit every response shares is
learned: here all answers open with "Of course! ". `inspect` shows it among the common openings;
after training, the model opens held-out replies with it, on prompts unlike the training ones.
Replies and per-turn log Pr(y | x) on held-out conversations are printed before and after."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

HABIT = "Of course! "
HELD_OUT_PROMPTS = ("What is the capital of Italy?", "Give me one tip for sleeping well.",
                    "Why is the sky blue?", "Suggest a name for a pet turtle.")

log = logging.getLogger(__name__)


def habit_dialogues(count: int, seed: int) -> list[dict[str, Any]]:
    """Short dialogues whose answers are right and all open with the habit."""
    rng = random.Random(seed)
    colors = ["red", "blue", "green", "yellow", "purple", "orange"]
    animals = [("cat", "chat"), ("dog", "chien"), ("horse", "cheval"), ("bird", "oiseau"), ("fish", "poisson")]
    records = []
    for _ in range(count):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        english, french = rng.choice(animals)
        color = rng.choice(colors)
        pairs = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}."),
                 (f"How do you say '{english}' in French?", f"In French, '{english}' is '{french}'."),
                 (f"Name something that is {color}.", f"Something {color}: a {color} balloon."),
                 (f"Is {a} larger than {b}?", f"{'Yes' if a > b else 'No'}, {a} is {'larger' if a > b else 'not larger'} than {b}.")]
        rng.shuffle(pairs)
        messages = []
        for question, answer in pairs[:rng.randint(1, 2)]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": HABIT + answer}]
        records.append({"messages": messages})
    return records


def run_real_demo(output_dir: str | Path, steps: int = 30, progress: bool = True) -> dict[str, Any]:
    from onepass.config import load_config
    from onepass.demo.smollm2 import smollm2
    from onepass.train.run import build_run
    from onepass.train.trainer import Trainer

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = smollm2()
    for name, rows in (("train.jsonl", habit_dialogues(240, 0)), ("eval.jsonl", _held_out())):
        (output / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [
        f"model={model_dir}", f"output_dir={output}", f"data.train=[{output / 'train.jsonl'}]",
        f"data.eval=[{output / 'eval.jsonl'}]", f"data.cache_dir={output / 'cache'}", "max_seq_len=512",
        "batch_size=1", "grad_accum=1", "lr=1e-3", "warmup_steps=3", f"max_steps={steps}", "lora.enabled=true",
        "lora.r=16", "lora.alpha=32", "precision=bf16", "eval_every=10", "resume=never",
        f"progress={str(progress).lower()}"])
    log.info(f"onepass demo --real: SmolLM2-135M-Instruct ({model_dir}), LoRA, bf16 autocast, CPU")
    run = build_run(config)
    before = _replies_and_scores(run)
    result = Trainer(run).fit()
    after = _replies_and_scores(run)
    report = {"before": before, "after": after, "steps": result.steps,
              "eval_loss_before": (result.eval_before or {}).get("eval_loss"),
              "eval_loss_after": (result.eval_after or {}).get("eval_loss"),
              "opens_with_habit_before": sum(r.startswith(HABIT.strip()) for r in before["replies"]),
              "opens_with_habit_after": sum(r.startswith(HABIT.strip()) for r in after["replies"]),
              "seconds": round(time.perf_counter() - started, 1)}
    (output / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _held_out() -> list[dict[str, Any]]:
    """Unrelated prompts answered with the habit, to score log Pr(y | x) before and after."""
    answers = ("The capital of Italy is Rome.", "Go to bed at the same time every day.",
               "Sunlight scatters off the air, and blue light scatters most.", "How about Shelly?")
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": HABIT + a}]}
            for p, a in zip(HELD_OUT_PROMPTS, answers)]


def _replies_and_scores(run: Any) -> dict[str, Any]:
    from onepass.data.formats import to_conversation
    from onepass.data.types import Record
    from onepass.score.chat import reply
    from onepass.score.scoring import score_conversations

    model = run.model
    replies = [reply(model, run.tokenizer, run.template, [{"role": "user", "content": p}], max_new_tokens=24)
               for p in HELD_OUT_PROMPTS]
    conversations = [to_conversation(Record("held-out", f"record {i + 1}", r), "messages")
                     for i, r in enumerate(_held_out())]
    rows = score_conversations(model, run.tokenizer, run.template, conversations, head_loss=run.handle.head_loss)
    return {"replies": replies, "logprob_response": [round(r["logprob_response"], 2) for r in rows]}


def report_view(report: dict[str, Any], output: Path) -> list[Any]:
    """What `onepass demo --real` shows at the end (rich renderables)."""
    from rich.table import Table

    table = Table(title="held-out prompts: greedy replies and log Pr(reference reply | prompt)")
    for column in ("prompt", "before", "after", "log Pr before → after"):
        table.add_column(column)
    for i, prompt in enumerate(HELD_OUT_PROMPTS):
        table.add_row(prompt, report["before"]["replies"][i], report["after"]["replies"][i],
                      f"{report['before']['logprob_response'][i]:.1f} → {report['after']['logprob_response'][i]:.1f}")
    return [table, f"replies opening with \"{HABIT.strip()}\": {report['opens_with_habit_before']} → "
                   f"{report['opens_with_habit_after']} of {len(HELD_OUT_PROMPTS)}; held-out loss "
                   f"{report['eval_loss_before']:.3f} → {report['eval_loss_after']:.3f} in {report['steps']} steps, "
                   f"{report['seconds']} s",
            f"model: {output / 'final'}\nplot:  {output / 'loss.png'}\nreport: {output / 'eval.json'}"]
