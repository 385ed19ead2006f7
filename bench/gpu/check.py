"""The GPU check: onepass's CUDA paths proven and measured on one CUDA GPU, in one run, one summary.

1. Equivalence at bf16: for each attention that runs on this GPU (flash-attention varlen when
   transformers finds it usable, onepass's packed SDPA), a packed row's per-token log-probabilities
   equal the model's own eager forward on each conversation alone, and the packed loss equals the
   sum of the per-conversation losses over the same denominator.
2. Throughput, bf16: onepass vs TRL SFTTrainer (and TRL with Liger kernels when liger-kernel is
   installed) on a ~0.5B Llama-shaped model built from a config and on SmolLM2-135M-Instruct (when
   its converted asset is on this machine): tokens/s, MFU against a bf16 matmul peak measured here at
   the model's MLP shape, peak GPU memory. Each run in its own process (bench/real_model.py --run).

    bash bench/gpu/check.sh            # on a CUDA machine (about 5 minutes on an H100)
    bash bench/gpu/check.sh --dry-run  # the same plumbing on the CPU with a tiny model (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))
from real_model import TAGGED_SMOLLM2  # noqa: E402
from train_throughput import on_mimalloc, run_child  # noqa: E402

UNTAGGED = TAGGED_SMOLLM2.replace("{% generation %}", "").replace("{% endgeneration %}", "")
LLAMA_05B = dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=4096,
                 vocab_size=32000)  # ~0.5B parameters with untied input and output embeddings
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=512)


def build_llama(directory: Path, shape: dict) -> Path:
    """A random Llama-shaped model from a config, with a locally trained tokenizer and a ChatML template
    rendered exactly like the tagged copy TRL gets."""
    from onepass.demo.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(directory, vocab_size=512)
    tokenizer.chat_template = UNTAGGED
    tokenizer.save_pretrained(str(directory))
    shape = dict(shape)
    build_model(directory, shape.pop("vocab_size"), num_layers=shape.pop("num_layers"),
                num_heads=shape.pop("num_heads"), num_kv_heads=shape.pop("num_kv_heads"), **shape)
    return directory


def equivalence(device: str) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for every attention this device runs."""
    import numpy as np
    import torch

    from onepass.data.types import Example
    from onepass.demo.tiny import build_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(3, 500, n).astype(np.int32), np.ones(n, np.int8), np.zeros(n, np.int32))
                for n in (37, 5, 120, 64, 9)]
    results = []
    for name, model in (("llama", build_model(None, 512, hidden_size=128, num_layers=2, intermediate_size=256)),
                        ("sliding-window", sliding_window_model())):
        results += equivalence_of(name, model.to(device), examples, device)
    return results


def sliding_window_model():
    """A tiny Mistral whose 16-token window is shorter than most probe conversations."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=16))


def equivalence_of(name: str, model, examples, device: str) -> list[tuple[str, bool, str]]:
    import numpy as np
    import torch

    from onepass.train.batch import collate
    from onepass.train.check import check_packing
    from onepass.train.loss import label_nll, sft_loss
    from onepass.train.attention import PACKED_ATTENTION, choose_attention, use_packed_attention

    attentions = {PACKED_ATTENTION, choose_attention(device, torch.bfloat16, type(model))}
    results = []
    for attention in sorted(attentions):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model.set_attn_implementation("eager")
            expected = []
            for e in examples:
                ids = torch.from_numpy(e.input_ids.astype(np.int64))[None].to(device)
                logits = model(input_ids=ids).logits[0, :-1].float()
                expected.append(-torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0])
            expected = torch.cat(expected)
            if attention == PACKED_ATTENTION:
                use_packed_attention(model)
            else:
                model.set_attn_implementation(attention)
            packed = collate(examples).to(device)
            nll, _ = label_nll(model, packed)
            worst = float((nll.float() - expected).abs().max())
            results.append((f"{name}, {attention}: packed log-probs == each conversation alone (bf16, |diff| < "
                            "0.05)", worst < 0.05, f"max |diff| {worst:.4f} nats"))
            whole = float(sft_loss(model, packed, packed.units)[0])
            alone = sum(float(sft_loss(model, collate([e]).to(device), packed.units)[0]) for e in examples)
            relative = abs(whole - alone) / abs(alone)
            results.append((f"{name}, {attention}: packed loss == unpacked loss (bf16, relative < 1e-2)",
                            relative < 1e-2, f"{whole:.5f} vs {alone:.5f}"))
        if attention == PACKED_ATTENTION:
            results.append(tree_equivalence(name, model, device))
        if attention != PACKED_ATTENTION:  # the start-up check as a run on this GPU makes it, flash included
            try:
                line, passed = check_packing(model).describe(), True
            except Exception as error:  # noqa: BLE001 - a refusal is a failed check here
                line, passed = str(error), False
            results.append((f"{name}: the start-up check with {attention}", passed, line))
    return results


def tree_equivalence(name: str, model, device: str) -> tuple[str, bool, str]:
    """Three completions of one prompt as one tree (packed SDPA, path by path): each completion's
    log-probabilities equal the prompt and that completion alone, at bf16."""
    import numpy as np
    import torch

    from onepass.data.tree import TokenPath, merge_paths, tree_example
    from onepass.score.scoring import node_logprobs, token_logprobs
    from onepass.train.attention import use_packed_attention

    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 500, 40)
    paths = [TokenPath(np.concatenate([prompt, rng.integers(3, 500, n)]).astype(np.int32),
                       np.r_[np.zeros(40), np.ones(n)].astype(np.int8), np.zeros(40 + n, np.int32)) for n in (30, 7, 18)]
    tree = merge_paths(paths)
    use_packed_attention(model)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        [values] = node_logprobs(model, [tree_example(tree)])
        alone = token_logprobs(model, [tree_example(merge_paths([path])) for path in paths])
    worst = max(float(np.abs(values[nodes[1:]] - expected).max()) for nodes, expected in zip(tree.paths, alone))
    return (f"{name}, tree: each completion's log-probs == it alone after the prompt (bf16, |diff| < 0.05)",
            worst < 0.05, f"max |diff| {worst:.4f} nats")


def smollm2_dir() -> Path | None:
    """The converted SmolLM2 asset if this machine has it (the GPU machine may have no network)."""
    from onepass.demo.smollm2 import default_asset_dir

    directory = default_asset_dir() / "SmolLM2-135M-Instruct"
    return directory if (directory / "config.json").exists() else None


def throughput(work: Path, name: str, model_dir: Path, dry_run: bool) -> dict:
    import importlib.util

    tools = ["onepass", "trl"] + (["trl_liger"] if importlib.util.find_spec("liger_kernel") else [])
    results = {}
    for tool in tools:
        command = [sys.executable, str(BENCH / "real_model.py"), "--run", f"{tool}-bf16", "--work", str(work),
                   "--model-dir", str(model_dir), "--max-seq-len", "1024" if dry_run else "2048",
                   "--rows-per-step", "2" if dry_run else "8", "--threads", str(os.cpu_count() or 1)]
        env = {**os.environ, "ONEPASS_CACHE": str(work)}
        # onepass on the allocator `onepass train` starts on: mimalloc on the CPU, the C library's on a GPU machine
        on_cpu = dry_run or not Path("/dev/nvidiactl").exists()
        results[tool] = result = run_child(f"{name} {tool}", command,
                                           on_mimalloc(env) if tool == "onepass" and on_cpu else env)
        result["mfu"] = result["model_flops"] / result["seconds"] / result["matmul_peak_flops"] \
            if "model_flops" in result else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: the plumbing only")
    parser.add_argument("--out", default=None, help="write the summary as JSON here too")
    args = parser.parse_args()
    import torch

    from onepass.demo.tiny import random_conversations

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu/check.sh: no CUDA GPU here (torch.cuda.is_available() is False). "
                         "Fix: run it on a CUDA machine, or add --dry-run for the CPU plumbing check.")
    device = "cpu" if args.dry_run else "cuda"
    started = time.perf_counter()
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
               "equivalence": [], "throughput": {}}
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        summary["equivalence"] = [dict(check=c, passed=ok, detail=d) for c, ok, d in equivalence(device)]
        records = random_conversations(48 if args.dry_run else 1200, seed=0, max_turns=3)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        models = {"llama-tiny" if args.dry_run else "llama-0.5b": build_llama(work / "llama", TINY if args.dry_run
                                                                               else LLAMA_05B)}
        if not args.dry_run and smollm2_dir() is not None:
            models["smollm2-135m"] = smollm2_dir()
        for name, model_dir in models.items():
            summary["throughput"][name] = throughput(work, name, model_dir, args.dry_run)
    summary["seconds"] = time.perf_counter() - started
    print_summary(summary)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if not all(row["passed"] for row in summary["equivalence"]):
        raise SystemExit(1)


def print_summary(summary: dict) -> None:
    print(f"\n== onepass GPU check on {summary['device']} ({summary['seconds']:.0f} s) ==")
    for row in summary["equivalence"]:
        print(f"  [{'PASS' if row['passed'] else 'FAIL'}] {row['check']}: {row['detail']}")
    for name, results in summary["throughput"].items():
        print(f"  {name}:")
        for tool, r in results.items():
            memory = f"{r['peak_gpu_mib']:,.0f} MiB GPU" if "peak_gpu_mib" in r else f"{r['peak_rss_mib']:,.0f} MiB RSS"
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            print(f"    {tool:10s} {r['tokens_per_sec']:>10,.0f} tok/s{mfu}, peak {memory}")
        if "trl" in results:
            print(f"    onepass / TRL: {results['onepass']['tokens_per_sec'] / results['trl']['tokens_per_sec']:.2f}x")


if __name__ == "__main__":
    main()
