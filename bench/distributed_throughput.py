"""Data-parallel training throughput: onepass (DDP and FSDP2) vs TRL SFTTrainer (DDP), 2 ranks
under torchrun, same model, data, global batch and machine; plus onepass in one process for scale.

On a CPU machine this runs the gloo backend with one thread per rank; on a GPU machine
(`--device-note`) torchrun gives each rank its GPU and nccl. Reported: real tokens/s and trained
tokens/s over one epoch (model set-up and data preparation excluded), and the ratios to TRL.

    .venv/bin/python bench/distributed_throughput.py [--conversations 256] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import MODEL, on_mimalloc, run_child, run_trl, setup  # noqa: E402  (shared set-up)


def run_onepass(work: Path, max_seq_len: int, rows_per_rank: int, strategy: str) -> dict:
    import torch

    from onepass.train import distributed
    from onepass.config import load_config
    from onepass.train.run import build_run
    from onepass.train.step import train_step

    cluster = distributed.init()
    config = load_config(None, [f"model={work / 'model'}", f"data.train=[{work / 'train.jsonl'}]",
                                f"output_dir={work / ('onepass-' + strategy)}", f"max_seq_len={max_seq_len}",
                                f"batch_size={rows_per_rank}", "grad_accum=1", "lr=1e-4", "progress=false",
                                "resume=never", f"data.cache_dir={work / 'cache'}", f"strategy={strategy}",
                                "precision=fp32"])  # as TRL runs here
    run = build_run(config)
    torch.manual_seed(0)
    batches = [run.plan.step_batches(step) for step in range(run.plan.steps_per_epoch)]
    distributed.barrier(cluster)
    start = time.perf_counter()
    for micro_batches in batches:
        train_step(run.objective, run.optimizer, run.scheduler, micro_batches, run.step_options, cluster)
    distributed.barrier(cluster)
    seconds = time.perf_counter() - start
    tokens, trained = distributed.all_reduce_sum(
        [sum(b.num_tokens for s in batches for b in s), sum(b.num_trained_tokens for s in batches for b in s)], cluster)
    return {"seconds": seconds, "tokens": int(tokens), "trained_tokens": int(trained), "steps": len(batches),
            "ranks": cluster.world_size, "is_main": cluster.is_main}


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.run.startswith("onepass"):
        strategy = "fsdp" if args.run.endswith("fsdp") else "ddp"
        result = run_onepass(work, args.max_seq_len, args.rows_per_rank, strategy)
        if result.pop("is_main"):
            print("RESULT " + json.dumps(result))
        return
    import torch
    import torch.distributed as dist

    result = run_trl(work, args.max_seq_len, args.rows_per_rank, packing=True)
    if dist.is_initialized():  # TRL's counts are this rank's: sum them over ranks
        totals = torch.tensor([result["tokens"], result["trained_tokens"], result["padding_tokens"]],
                              dtype=torch.float64)
        dist.all_reduce(totals)
        result.update(tokens=int(totals[0]), trained_tokens=int(totals[1]), padding_tokens=int(totals[2]),
                      ranks=dist.get_world_size())
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result))


def launch(run: str, nproc: int, args: argparse.Namespace, work: str) -> dict:
    script = [__file__, "--child", run, "--work", work, "--max-seq-len", str(args.max_seq_len),
              "--rows-per-rank", str(args.rows_per_step // nproc)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 or run != "onepass-1" else [sys.executable]
    env = {**os.environ, "ONEPASS_CACHE": work}
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return run_child(run, [*launcher, *script], on_mimalloc(env) if run.startswith("onepass") else env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--rows-per-step", type=int, default=2, help="global packed rows per optimizer step")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="bench/results/distributed_throughput.json")
    parser.add_argument("--child", dest="run", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--rows-per-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        setup(Path(temp), args.conversations)
        for run, nproc in (("onepass-1", 1), ("onepass-ddp", args.nproc), ("onepass-fsdp", args.nproc),
                           ("trl-ddp", args.nproc)):
            result = launch(run, nproc, args, temp)
            results[run] = result
            print(f"{run:13s} ranks {nproc}  {result['seconds']:7.1f} s  {result['tokens_per_sec']:9,.0f} tok/s  "
                  f"{result['trained_tokens_per_sec']:9,.0f} trained tok/s")
    trl = results["trl-ddp"]
    summary = {
        "ddp_tokens_per_sec_ratio_vs_trl_ddp": results["onepass-ddp"]["tokens_per_sec"] / trl["tokens_per_sec"],
        "fsdp_tokens_per_sec_ratio_vs_trl_ddp": results["onepass-fsdp"]["tokens_per_sec"] / trl["tokens_per_sec"],
        "ddp_trained_tokens_per_sec_ratio_vs_trl_ddp":
            results["onepass-ddp"]["trained_tokens_per_sec"] / trl["trained_tokens_per_sec"],
        "ddp_speed_vs_one_process": results["onepass-ddp"]["tokens_per_sec"] / results["onepass-1"]["tokens_per_sec"],
    }
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    results["summary"] = summary
    results["setup"] = {"conversations": args.conversations, "max_seq_len": args.max_seq_len,
                        "global_rows_per_step": args.rows_per_step, "ranks": args.nproc, "model": MODEL,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                        "threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
