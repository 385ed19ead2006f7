"""`onepass demo`: the whole product on a laptop CPU in a few minutes.

Builds a tiny tokenizer and a tiny Llama-style model locally, generates three-turn dialogues in
which later answers depend on earlier turns (the user states a name and a liking, then asks about
them), trains with one forward pass per conversation, and measures held-out exact-match accuracy
per assistant turn before and after training.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from onepass.score.chat import reply as chat_reply

log = logging.getLogger(__name__)

NAMES = ("ada alan grace linus barbara edsger donald ken dennis bjarne guido james john margaret radia sophie "
         "tim vint whitfield leslie niklaus frances kathleen hedy claude alonzo kurt emmy rosalind marie").split()
THINGS = ("tea coffee chess music apples rain snow books maps boats trains jazz cats dogs tennis soup bread "
          "rice stars clocks kites poems bikes owls frogs lamps shells roses ships puzzles").split()


def make_dialogues(count: int, seed: int) -> list[dict[str, Any]]:
    """Dialogues whose turn-2 and turn-3 answers can only be given by reading turn 1."""
    rng = random.Random(seed)
    dialogues = []
    for _ in range(count):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        questions = [("what do i like?", f"you like {thing}."), ("what is my name?", f"your name is {name}.")]
        rng.shuffle(questions)
        messages = [{"role": "user", "content": f"hi, i am {name} and i like {thing}."},
                    {"role": "assistant", "content": f"hello {name}! {thing} are nice."}]
        for question, answer in questions:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        dialogues.append({"messages": messages})
    return dialogues


def turn_accuracy(model: Any, tokenizer: Any, template: Any, dialogues: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match of the greedy reply for every assistant turn, given the reference history."""
    hits: list[list[int]] = []
    for dialogue in dialogues:
        messages = dialogue["messages"]
        for turn, index in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
            reply = chat_reply(model, tokenizer, template, messages[:index], max_new_tokens=12)
            while len(hits) <= turn:
                hits.append([])
            hits[turn].append(int(reply == messages[index]["content"]))
    per_turn = [sum(h) / len(h) for h in hits]
    total = sum(sum(h) for h in hits) / sum(len(h) for h in hits)
    return {"accuracy": total, "per_turn": per_turn}


def run_demo(output_dir: str | Path, steps: int = 400, num_train: int = 3000, num_eval: int = 60,
             progress: bool = True) -> dict[str, Any]:
    output = Path(output_dir)
    started = time.perf_counter()
    train, held_out = make_dialogues(num_train, seed=0), make_dialogues(num_eval, seed=1)
    corpus = [m["content"] for r in train[:500] for m in r["messages"]] + NAMES + THINGS
    config = tiny_run_config(output, train, held_out, corpus, steps, progress)
    log.info(f"onepass demo: {num_train} three-turn dialogues, tiny Llama (4 layers, 128 wide), CPU")
    return train_and_measure(config, turn_accuracy, held_out, started)


def train_and_measure(config: Any, accuracy: Any, held_out: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Build the run, measure `accuracy(model, tokenizer, template, held_out)` before and after training,
    and write the report to OUTPUT/eval.json."""
    from onepass.train.run import build_run
    from onepass.train.trainer import Trainer

    run = build_run(config)
    before = accuracy(run.model, run.tokenizer, run.template, held_out)
    result = Trainer(run).fit()
    after = accuracy(run.model, run.tokenizer, run.template, held_out)
    report = {"before": before, "after": after, "steps": result.steps,
              "eval_loss_before": (result.eval_before or {}).get("eval_loss"),
              "eval_loss_after": (result.eval_after or {}).get("eval_loss"),
              "seconds": round(time.perf_counter() - started, 1)}
    (Path(config.output_dir) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def tiny_run_config(output: Path, train: list[dict[str, Any]], held_out: list[dict[str, Any]], corpus: list[str],
                    steps: int, progress: bool, vocab_size: int = 640) -> Any:
    """The demos' run: the records written to OUTPUT/train.jsonl and eval.jsonl, a tiny tokenizer trained on
    `corpus` and a tiny Llama (4 layers, 128 wide) in OUTPUT/base_model, and their training config."""
    from onepass.config import load_config
    from onepass.demo.tiny import build_model, build_tokenizer

    output.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (output / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = build_tokenizer(output / "base_model", extra_text=corpus * 2, vocab_size=vocab_size)
    build_model(output / "base_model", vocab_size=len(tokenizer), hidden_size=128, num_layers=4, num_heads=4,
                num_kv_heads=2, intermediate_size=256, max_position_embeddings=512)
    # lr 1e-3: at 3e-3 whether the tiny model learns the task within 400 steps depended on the seed and on
    # the last bits of the loss's rounding (held-out accuracy 1.0, 0.63 and 0.18 across such changes);
    # at 1e-3 it reached 1.0 for seeds 0, 1 and 2
    return load_config(None, [
        f"model={output / 'base_model'}", f"output_dir={output}", f"data.train=[{output / 'train.jsonl'}]",
        f"data.eval=[{output / 'eval.jsonl'}]", f"data.cache_dir={output / 'cache'}", "max_seq_len=512",
        "batch_size=2", "grad_accum=1", "lr=1e-3", "warmup_steps=20", f"max_steps={steps}", "weight_decay=0.01",
        "seed=0", "eval_every=50", "precision=fp32", f"progress={str(progress).lower()}", "resume=never"])


def report_view(report: dict[str, Any], output: Path) -> list[Any]:
    """What `onepass demo` shows at the end (rich renderables): accuracy per turn before and after, the
    held-out loss, and where the files are."""
    from rich.table import Table

    table = Table(title="held-out exact-match accuracy per assistant turn")
    table.add_column("")
    turns = len(report["after"]["per_turn"])
    for turn in range(turns):
        table.add_column(f"turn {turn + 1}", justify="right")
    table.add_column("all", justify="right")
    for name in ("before", "after"):
        values = report[name]["per_turn"] + [report[name]["accuracy"]]
        table.add_row(f"{name} training", *(f"{v:.0%}" for v in values))
    return [table, f"held-out loss {report['eval_loss_before']:.3f} → {report['eval_loss_after']:.3f} "
                   f"in {report['steps']} steps, {report['seconds']} s",
            f"model:   {output / 'final'}\nmetrics: {output / 'metrics.jsonl'}\n"
            f"plot:    {output / 'loss.png'}\nreport:  {output / 'eval.json'}"]
