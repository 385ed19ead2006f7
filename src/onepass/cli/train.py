"""`onepass train CONFIG.yaml [key=value ...]`: fine-tune a model (also under torchrun)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any


def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model: onepass train CONFIG.yaml [key=value ...]",
        epilog="Several GPUs: torchrun --nproc_per_node N -m onepass train CONFIG.yaml [strategy=ddp|fsdp]. "
               "SIGINT/SIGTERM save a checkpoint; the same command resumes. With keep_best: true the checkpoint "
               "with the lowest held-out loss is kept in OUTPUT_DIR/checkpoints (named in checkpoints/BEST) and "
               "exported as OUTPUT_DIR/final. With eval_samples: N, greedy replies to the first N held-out "
               "prompts at each evaluation go to OUTPUT_DIR/samples.jsonl (and to the trackers of report_to: "
               "OUTPUT_DIR/tensorboard, OUTPUT_DIR/wandb).")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 data.loss_on=last")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from onepass.config import load_config
    from onepass.train import distributed
    from onepass.train.trainer import EARLY_STOPPING, train

    cluster = distributed.init()  # under torchrun: join the process group first, so errors are reported once
    config = load_config(args.config, args.overrides)
    result = train(config)
    if result.stopped_by == EARLY_STOPPING:
        if cluster.is_main:
            print(f"stopped early after step {result.steps}: held-out loss did not improve for "
                  f"{config.early_stopping.patience} evaluations", file=sys.stderr)
    elif result.stopped_by is not None:
        if cluster.is_main:
            print(f"stopped by {result.stopped_by} after step {result.steps}; checkpoint saved in "
                  f"{Path(config.output_dir) / 'checkpoints'}. Run the same command to resume.", file=sys.stderr)
        return 128 + (signal.SIGTERM if result.stopped_by == "SIGTERM" else signal.SIGINT)
    if cluster.is_main:
        print(f"trained {result.steps} steps; final model: {result.final_dir}; metrics: "
              f"{Path(config.output_dir) / 'metrics.jsonl'}; plot: {Path(config.output_dir) / 'loss.png'}")
    return 0
