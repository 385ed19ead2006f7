"""Training throughput: onepass vs TRL SFTTrainer (assistant_only_loss=True, with and without packing).

Same model (a Llama-style model built from a config), same conversations, same tokenizer, same
token budget per optimizer step, same machine; each configuration runs one epoch in its own
process so that peak memory (max RSS) is its own. Reported: real (non-padding) tokens/s, trained
tokens/s, peak memory, the ratios to TRL's best configuration, and onepass's model-FLOPs
utilisation against a measured fp32 matmul peak.

    .venv/bin/python bench/train_throughput.py [--conversations 256] [--max-seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704)
TRL_CHATML = ("{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def setup(work: Path, conversations: int) -> None:
    from onepass.demo.tiny import build_model, build_tokenizer, random_conversations

    records = random_conversations(conversations, seed=0)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = [m["content"] for r in records[:300] for m in r["messages"]]
    tokenizer = build_tokenizer(work / "model", extra_text=corpus, vocab_size=4096)
    build_model(work / "model", vocab_size=len(tokenizer), max_position_embeddings=4096, **MODEL)


def run_onepass(work: Path, max_seq_len: int, rows_per_step: int) -> dict:
    import torch

    from onepass import allocator
    from onepass.config import load_config
    from onepass.train.run import build_run
    from onepass.train.step import train_step

    allocator.cpu_memory_settings()  # as `onepass train` sets the process up

    config = load_config(None, [f"model={work / 'model'}", f"data.train=[{work / 'train.jsonl'}]",
                                f"output_dir={work / 'onepass'}", f"max_seq_len={max_seq_len}",
                                f"batch_size={rows_per_step}", "grad_accum=1", "lr=1e-4", "progress=false",
                                "resume=never", f"data.cache_dir={work / 'cache'}", "precision=fp32"])  # as TRL runs here
    run = build_run(config)
    torch.manual_seed(0)
    batches = [run.plan.step_batches(step) for step in range(run.plan.steps_per_epoch)]
    start = time.perf_counter()
    for micro_batches in batches:
        train_step(run.objective, run.optimizer, run.scheduler, micro_batches, run.step_options)
    seconds = time.perf_counter() - start
    tokens = sum(b.num_tokens for step in batches for b in step)
    trained = sum(b.num_trained_tokens for step in batches for b in step)
    embedding = run.model.get_input_embeddings().weight.numel()
    head = run.model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in run.model.parameters()) - embedding - head
    # forward + backward matmul FLOPs: 6 per weight per token in the body; the output projection
    # runs on trained positions only (attention scores are left out: short rows)
    flops = 6 * (body * tokens + head * trained)
    return {"seconds": seconds, "tokens": tokens, "trained_tokens": trained, "steps": len(batches),
            "padding_tokens": 0, "model_flops": flops}


def run_trl(work: Path, max_seq_len: int, rows_per_step: int, packing: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    tokenizer.chat_template = TRL_CHATML
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    mean_length = sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                      for r in records[:64]) / 64
    # Same token budget per step: packed rows of max_seq_len, or as many padded conversations.
    batch = rows_per_step if packing else max(1, round(rows_per_step * max_seq_len / mean_length))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    args = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=max_seq_len,
                     packing=packing, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-4,
                     report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                     dataloader_num_workers=0, disable_tqdm=True,
                     # as onepass runs here: fp32, no activation checkpointing (SFTConfig's defaults are
                     # bf16=True and gradient_checkpointing=True)
                     bf16=False, gradient_checkpointing=False)
    counts = {"tokens": 0, "padding": 0, "trained": 0}

    class Count(TrainerCallback):
        pass

    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(records), callbacks=[Count()])
    collator = trainer.data_collator

    def counting_collator(features):
        out = collator(features)
        real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(out["input_ids"].numel())
        counts["tokens"] += real
        counts["padding"] += int(out["input_ids"].numel()) - real
        counts["trained"] += int((out["labels"] != -100).sum())
        return out

    trainer.data_collator = counting_collator
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": counts["tokens"], "trained_tokens": counts["trained"],
            "padding_tokens": counts["padding"], "steps": result.global_step, "batch": batch}


def on_mimalloc(env: dict[str, str]) -> dict[str, str]:
    """A child's environment on the allocator `onepass train` starts on (onepass.allocator: mimalloc where
    it is installed, unless ONEPASS_ALLOCATOR=system)."""
    from onepass import allocator

    return allocator.preload_environment(env) or env


def run_child(name: str, command: list[str], env: dict[str, str]) -> dict:
    """Run one measured configuration in its own process; its `RESULT {...}` line, with rates added."""
    output = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(output.stdout[-3000:], output.stderr[-3000:])
        raise SystemExit(f"{name} failed")
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_sec"] = result["tokens"] / result["seconds"]
    result["trained_tokens_per_sec"] = result["trained_tokens"] / result["seconds"]
    return result


def matmul_peak_flops() -> float:
    import torch

    size = 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.run == "onepass":
        result = run_onepass(work, args.max_seq_len, args.rows_per_step)
    else:
        result = run_trl(work, args.max_seq_len, args.rows_per_step, packing=args.run == "trl-packing")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.run == "onepass":
        result["matmul_peak_flops"] = matmul_peak_flops()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--rows-per-step", type=int, default=2)
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        setup(Path(temp), args.conversations)
        for run in ("onepass", "trl", "trl-packing"):
            command = [sys.executable, __file__, "--run", run, "--work", temp, "--max-seq-len", str(args.max_seq_len),
                       "--rows-per-step", str(args.rows_per_step)]
            env = {**os.environ, "ONEPASS_CACHE": temp}
            result = run_child(run, command, on_mimalloc(env) if run == "onepass" else env)
            results[run] = result
            print(f"{run:12s} {result['seconds']:7.1f} s  {result['tokens_per_sec']:9,.0f} tok/s  "
                  f"{result['trained_tokens_per_sec']:9,.0f} trained tok/s  padding {result['padding_tokens']:,}  "
                  f"peak RSS {result['peak_rss_mib']:,.0f} MiB")
    best = max(("trl", "trl-packing"), key=lambda k: results[k]["tokens_per_sec"])
    one = results["onepass"]
    summary = {
        "trl_best_config": best,
        "tokens_per_sec_ratio_vs_trl_best": one["tokens_per_sec"] / results[best]["tokens_per_sec"],
        "trained_tokens_per_sec_ratio_vs_trl_best": one["trained_tokens_per_sec"] / results[best]["trained_tokens_per_sec"],
        "peak_rss_ratio_vs_trl_best": one["peak_rss_mib"] / results[best]["peak_rss_mib"],
        "onepass_mfu": one["model_flops"] / one["seconds"] / one["matmul_peak_flops"],
    }
    for key, value in summary.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    results["summary"] = summary
    results["setup"] = {"conversations": args.conversations, "max_seq_len": args.max_seq_len,
                        "rows_per_step": args.rows_per_step, "model": MODEL,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch_threads": "default"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
