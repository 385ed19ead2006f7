"""Data preparation throughput: onepass vs TRL SFTTrainer's own dataset preparation.

Same conversations, same tokenizer, same rendered text (ChatML), one process and one tokenizer
thread each (RAYON_NUM_THREADS=1), so the figures are per core. TRL gets the ChatML template
with `{% generation %}` markers that `assistant_only_loss=True` needs; onepass gets the plain one.

    .venv/bin/python bench/prepare_throughput.py [--conversations 4000]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TRL_CHATML = ("{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def time_onepass(records: list[dict], tokenizer_dir: Path, work: Path) -> tuple[float, int, int]:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import prepare
    from onepass.data.tokenizer import load_tokenizer
    from onepass.data.types import RenderOptions

    path = work / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer(tokenizer_dir)
    template = load_chat_template(tokenizer, "chatml")
    start = time.perf_counter()
    data = prepare([path], tokenizer, template, RenderOptions(), use_cache=False, num_workers=1, progress=False)
    seconds = time.perf_counter() - start
    return seconds, data.stats.tokens, data.stats.trained_tokens


def time_trl(records: list[dict], tokenizer_dir: Path, work: Path) -> tuple[float, int, int]:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from onepass.demo.tiny import build_model

    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = TRL_CHATML
    model = build_model(None, vocab_size=len(tokenizer))
    args = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=None, report_to=[],
                     dataset_num_proc=None, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(records[:2]))
    dataset = datasets.Dataset.from_list(records)
    start = time.perf_counter()
    prepared = trainer._prepare_dataset(dataset, tokenizer, args, packing=False, formatting_func=None,
                                        dataset_name="bench")
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    trained = sum(sum(1 for label in labels if label != -100) for labels in prepared["labels"])
    return seconds, tokens, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--out", default="bench/results/prepare_throughput.json")
    args = parser.parse_args()

    from onepass.demo.tiny import build_tokenizer, random_conversations

    records = random_conversations(args.conversations, seed=0)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        corpus = [m["content"] for r in records[:500] for m in r["messages"]]
        build_tokenizer(work / "tokenizer", extra_text=corpus, vocab_size=4096)
        results = {}
        for name, run in (("onepass", time_onepass), ("trl", time_trl)):
            seconds, tokens, trained = run(records, work / "tokenizer", work)
            results[name] = {"seconds": round(seconds, 3), "examples_per_sec": round(len(records) / seconds, 1),
                             "tokens_per_sec": round(tokens / seconds), "tokens": tokens,
                             "trained_tokens": trained}
            print(f"{name:8s} {seconds:7.2f} s  {len(records) / seconds:9.1f} examples/s  "
                  f"{tokens / seconds:11,.0f} tokens/s  ({tokens:,} tokens, {trained:,} trained)")
    ratio = results["onepass"]["examples_per_sec"] / results["trl"]["examples_per_sec"]
    print(f"onepass / TRL throughput per core: {ratio:.1f}x")
    results["ratio_onepass_over_trl"] = round(ratio, 2)
    results["conversations"] = args.conversations
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 used by each"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
