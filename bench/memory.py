"""Where a training run's memory goes, on the real model (SmolLM2-135M-Instruct, the data and step size
of bench/real_model.py): resident memory measured at each stage of one process, and the parts that
can be counted exactly (weights, gradients, AdamW state, the loss chunk's logits and the output layer's
gradient, the activations a step keeps for its backward pass, counted by a saved-tensors hook, not
under --checkpointing), split into what the run holds throughout and what a step adds at its peak; the
rest of the peak is data, allocator slack and what the runtime grows by (kernel caches, threads).

    .venv/bin/python bench/memory.py [--precision bf16|fp32] [--checkpointing]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_model import onepass_run, setup  # noqa: E402

MIB = 2 ** 20


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=0, help="default: one epoch, as bench/real_model.py runs")
    parser.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing: true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from onepass import allocator

    allocator.restart_on_mimalloc()  # the allocator `onepass train` runs on (ONEPASS_ALLOCATOR=system: glibc's)
    stages = {"python + imports": None}
    import torch

    from onepass.accel.lean_activations import SavedBytes
    from onepass.train.step import train_step

    torch.set_num_threads(2)
    stages["python + imports"] = rss_mib()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        model_dir = setup(work, 160)
        run = onepass_run(work, model_dir, args.precision, checkpointing=args.checkpointing)
        config = run.config
        stages["+ data and model (build_run)"] = rss_mib()
        steps = args.steps or run.plan.steps_per_epoch
        # the most bytes a step's forward pass kept for its backward pass; not under checkpointing, whose own
        # saved-tensors hooks hide the layers' tensors from an outer one
        activations = None if args.checkpointing else 0
        for step in range(steps):
            saved = SavedBytes(run.model.parameters()) if activations is not None else contextlib.nullcontext()
            with saved:
                train_step(run.objective, run.optimizer, run.scheduler, run.plan.step_batches(step),
                           run.step_options)
            if activations is not None:
                activations = max(activations, saved.total)
            if step < 2 or (step + 1) % 10 == 0 or step + 1 == steps:
                stages[f"after step {step + 1}"] = rss_mib()
        parameters = sum(p.numel() for p in run.model.parameters())
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        vocab, width = run.model.get_output_embeddings().weight.shape
        chunk = min(config.loss_chunk_size, max(b.num_trained_tokens for s in range(steps)
                                                 for b in run.plan.step_batches(s)))
    held = {
        "python, torch, transformers (after imports)": stages["python + imports"],
        "weights (fp32)": parameters * 4 / MIB,
        "AdamW state (fp32 exp_avg + exp_avg_sq)": trainable * 8 / MIB,
        # (no bf16 copy of the decoder's weights: without checkpointing, linear layers keep their fp32 weight
        # for backward and cast it again there, casts.recast_weights; the output layer's bf16 copy is the
        # loss's, below; under checkpointing autocast's copies count among the rest)
    }
    step_parts = {  # under checkpointing the activations are not counted: they fall into the rest
        **({} if activations is None else {"activations kept for backward (the largest step's)": activations / MIB}),
        # the fused loss: one chunk's logits in the compute dtype, overwritten by their gradient (the fp32
        # softmax runs 4 MiB of rows at a time), and the output layer's gradient made in forward, in fp32
        # (under bf16 also its bf16 matmul output before the cast)
        "loss chunk: logits and their gradient, output-layer gradient": (
            chunk * vocab * (2 if args.precision == "bf16" else 4)
            + vocab * width * (6 if args.precision == "bf16" else 4)) / MIB,
        "gradients (fp32, made in backward, freed after the step)": trainable * 4 / MIB,
    }
    peak = peak_mib()
    step = peak - sum(held.values())
    other = step - sum(step_parts.values())
    print(f"{args.precision}: peak RSS {peak:,.0f} MiB ({allocator.active()} allocator)")
    print("  resident memory by stage:")
    for name, value in stages.items():
        print(f"    {name:60s} {value:8,.0f} MiB")
    print(f"  held through the run: {sum(held.values()):,.0f} MiB")
    for name, value in held.items():
        print(f"    {name:60s} {value:8,.0f} MiB")
    print(f"  what a step adds at the peak: {step:,.0f} MiB")
    for name, value in step_parts.items():
        print(f"    {name:60s} {value:8,.0f} MiB")
    # negative when the parts were not all alive at once (gradients fill as activations are freed)
    print(f"    {'the rest (data, allocator slack, runtime growth)':60s} {other:8,.0f} MiB")
    out = Path(args.out or f"bench/results/memory_{args.precision}{'_ckpt' * args.checkpointing}.json")
    out.write_text(json.dumps({"precision": args.precision, "allocator": allocator.active(),
                               "checkpointing": args.checkpointing, "peak_rss_mib": peak, "stages_mib": stages,
                               "held_mib": held, "step_mib": step, "step_parts_mib": step_parts,
                               "rest_mib": other}, indent=2) + "\n")


if __name__ == "__main__":
    main()
