"""Scoring: one pass gives exactly what K separate passes give, and the totals add up."""

from __future__ import annotations

import pytest
import torch

from onepass.data.chat_template import load_chat_template
from onepass.train.batch import collate
from onepass.data.formats import detect_format, to_conversation
from onepass.train.loss import sft_loss
from onepass.train.attention import use_packed_attention
from onepass.data.types import Record
from onepass.data.types import RenderOptions
from onepass.score.scoring import (k_pass_turn_logprobs, render_for_scoring, score_conversations, summarise,
                                   token_logprobs, turn_logprobs)
from onepass.demo.tiny import build_model, random_conversations


@pytest.fixture(scope="module")
def model(tokenizer):
    return use_packed_attention(build_model(None, vocab_size=len(tokenizer), seed=1)).eval()


def conversations(count=6):
    return [to_conversation(Record("d.jsonl", f"line {i + 1}", r), detect_format(r))
            for i, r in enumerate(random_conversations(count, seed=7, max_turns=3))]


@pytest.mark.parametrize("template_name", ["chatml", "llama3"])
def test_one_pass_per_turn_logprobs_equal_k_separate_passes(model, tokenizer, template_name):
    template = load_chat_template(tokenizer, template_name)
    items = conversations()
    scored = render_for_scoring(items, tokenizer, template, RenderOptions())
    logprobs = token_logprobs(model, [s.example for s in scored])
    for conversation, item, values in zip(items, scored, logprobs):
        one_pass = turn_logprobs(item, values)
        k_pass = k_pass_turn_logprobs(model, tokenizer, template, conversation)
        assert len(one_pass) == len(conversation.assistant_indices)
        assert one_pass == pytest.approx(k_pass, abs=1e-4)


def test_joint_is_prompt_plus_response_and_the_sum_of_message_terms(model, tokenizer):
    rows = score_conversations(model, tokenizer, load_chat_template(tokenizer, "chatml"), conversations())
    for row in rows:
        assert row["logprob_joint"] == pytest.approx(row["logprob_prompt"] + row["logprob_response"], abs=1e-9)
        every_entry = sum(m["logprob"] + m["template_logprob"] for m in row["messages"])
        assert row["logprob_joint"] == pytest.approx(every_entry, abs=1e-6)
        assert [m["trained"] for m in row["messages"]] == [m["role"] == "assistant" for m in row["messages"]]
        assert row["logprob_response"] < 0 and row["logprob_prompt"] < 0


@pytest.mark.parametrize("template_name", ["chatml", "llama3", "gemma", "mistral"])
def test_a_trained_message_logprob_is_log_pr_of_its_response_and_they_sum_to_the_response_total(
        model, tokenizer, template_name):
    template = load_chat_template(tokenizer, template_name)
    items = [c for c in conversations(8) if c.messages[0].role != "system" or template_name != "gemma"]
    scored = render_for_scoring(items, tokenizer, template, RenderOptions())
    for item, values in zip(scored, token_logprobs(model, [s.example for s in scored])):
        row = summarise(item, values, 0)
        trained = [m for m in row["messages"] if m["trained"]]
        assert [m["logprob"] for m in trained] == pytest.approx(turn_logprobs(item, values), abs=1e-9)
        assert sum(m["logprob"] for m in trained) == pytest.approx(row["logprob_response"], abs=1e-9)
        assert sum(m["num_tokens"] for m in trained) == row["num_response_tokens"]
        if template_name != "mistral":  # Mistral writes no header before a response
            assert all(m["template_tokens"] > 0 for m in row["messages"][1:])  # each has its role header


def test_response_score_equals_the_trainers_token_normalised_loss(model, tokenizer):
    template = load_chat_template(tokenizer, "chatml")
    [scored] = render_for_scoring(conversations(1), tokenizer, template,
                                  RenderOptions())
    [row] = score_conversations(model, tokenizer, template, conversations(1))
    batch = collate([scored.example], "token")
    with torch.no_grad():
        loss, _ = sft_loss(model, batch, batch.units)
    assert -row["logprob_response"] / row["num_response_tokens"] == pytest.approx(loss.item(), rel=1e-5)


def test_raw_prompt_completion_is_scored_as_log_pr_completion_given_prompt(model, tokenizer):
    record = {"prompt": "The capital of France is", "completion": " Paris."}
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "prompt_completion")
    [row] = score_conversations(model, tokenizer, load_chat_template(tokenizer, "chatml"), [conversation])
    assert [m["role"] for m in row["messages"]] == ["prompt", "completion"]
    assert row["messages"][1]["logprob"] == pytest.approx(row["logprob_response"], abs=1e-9)


def test_candidates_are_ranked_by_log_pr_completion_given_prompt(model, tokenizer):
    from onepass.data.types import Record as Row
    from onepass.score.scoring import rank_candidates

    record = Row("d.jsonl", "line 1", {"prompt": [{"role": "user", "content": "Pick one"}],
                                       "completions": ["red", "blue and green", "yellow"]})
    [result] = rank_candidates(model, tokenizer, load_chat_template(tokenizer, "chatml"), [record])
    sums = [c["logprob"] for c in result["candidates"]]
    assert result["ranking_by_sum"] == sorted(range(3), key=lambda i: -sums[i])
    assert result["best_by_sum"] == result["ranking_by_sum"][0]
    for candidate in result["candidates"]:
        assert candidate["mean_logprob"] == pytest.approx(candidate["logprob"] / candidate["num_tokens"])


def test_ranking_n_completions_as_one_tree_equals_n_separate_passes(model, tokenizer):
    from onepass.data.types import Record as Row
    from onepass.score.scoring import candidate_conversations, rank_candidates

    template = load_chat_template(tokenizer, "chatml")
    rows = [{"prompt": [{"role": "user", "content": "Pick a colour for the sky"}],
             "completions": ["blue", "blue and green", "a deep red", "blue"]},
            {"prompt": "The capital of France is", "completions": [" Paris.", " Lyon.", " Paris, of course."]}]
    for data in rows:
        [result] = rank_candidates(model, tokenizer, template, [Row("d.jsonl", "line 1", data)])
        separate = score_conversations(model, tokenizer, template, candidate_conversations(data, "d.jsonl", "line 1"))
        assert [c["logprob"] for c in result["candidates"]] == pytest.approx(
            [r["logprob_response"] for r in separate], abs=1e-5)
        assert [c["num_tokens"] for c in result["candidates"]] == [r["num_response_tokens"] for r in separate]


def test_a_history_rewriting_conversation_is_scored_as_one_tree_equal_to_k_passes(model, tokenizer, tmp_path):
    from conftest import chat, write_jsonl
    from onepass.score.scoring import largest_k_pass_difference, score_file

    template = load_chat_template(tokenizer, "qwen3")
    data = chat("q1", "a1", "q2", "a2", "q3", "a3")
    for index, message in enumerate(m for m in data["messages"] if m["role"] == "assistant"):
        message["reasoning_content"] = f"thinking about turn {index}"
    path = write_jsonl(tmp_path / "d.jsonl", [data, chat("q", "a")])
    rows, conversations = score_file(model, tokenizer, template, str(path))
    assert rows[0]["tree"] and len(rows[0]["turn_logprobs"]) == 3 and "tree" not in rows[1]
    assert rows[0]["logprob_response"] == pytest.approx(sum(rows[0]["turn_logprobs"]), abs=1e-9)
    assert largest_k_pass_difference(model, tokenizer, template, conversations, rows) < 1e-4


def test_a_model_that_computes_each_conversation_alone_refuses_tree_scoring_with_one_error(tokenizer):
    """One conversation per forward cannot attend along a tree: ranking N completions as one tree is
    refused, never scored as a straight sequence."""
    from onepass.data.types import Record as Row
    from onepass.errors import OnepassError
    from onepass.score.scoring import rank_candidates
    from onepass.train.attention import SEPARATE, set_packing

    separate = build_model(None, vocab_size=len(tokenizer), seed=1).eval()
    set_packing(separate, SEPARATE)
    data = {"prompt": "The capital of France is", "completions": [" Paris.", " Lyon."]}
    with pytest.raises(OnepassError, match="cannot attend along a tree"):
        rank_candidates(separate, tokenizer, load_chat_template(tokenizer, "chatml"), [Row("d.jsonl", "line 1", data)])


@pytest.mark.parametrize("name", ["cpmant", "deepseek_v4", "llama"])
def test_scoring_equals_the_models_own_forward_on_each_turns_prefix_even_where_it_is_not_prefix_consistent(
        tokenizer, tmp_path, name):
    """Where a token's log-probability depends on what follows it, one pass cannot give each turn's
    K-pass value: the check finds it, and `score` then scores each turn from its own prefix."""
    import json

    import numpy as np
    import zoo_configs
    from transformers import AutoModelForCausalLM

    from onepass.score.scoring import score_file, turn_prefixes
    from onepass.train.check import apply_check, check_packing, own_forward_logprobs

    config = zoo_configs.tiny_config(name)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = use_packed_attention(AutoModelForCausalLM.from_config(config).eval())
    result = check_packing(model)
    apply_check(model, result.packing, result.attention)
    consistent = result.prefix_consistent
    assert consistent is (name == "llama")
    template = load_chat_template(tokenizer, "chatml")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in random_conversations(4, seed=7, max_turns=3)))
    rows, items = score_file(model, tokenizer, template, str(path), per_turn=not consistent)
    one_pass, _ = score_file(model, tokenizer, template, str(path))
    worst_one_pass = 0.0
    for row, single, conversation in zip(rows, one_pass, items):
        own = [float(own_forward_logprobs(model, [p])[p.loss_mask[1:] == 1].sum())
               for p in turn_prefixes(tokenizer, template, conversation)]
        assert row["method"] == ("one pass" if consistent else "per-turn prefix")
        assert row["turn_logprobs"] == pytest.approx(own, abs=2e-4)
        assert row["logprob_joint"] == pytest.approx(row["logprob_prompt"] + row["logprob_response"], abs=1e-9)
        worst_one_pass = max([worst_one_pass] + list(np.abs(np.subtract(single["turn_logprobs"], own))))
    assert (worst_one_pass > 1e-2) is not consistent  # one pass would have been wrong on this model
