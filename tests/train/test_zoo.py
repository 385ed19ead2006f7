"""Every decoder-only text architecture of the installed transformers: exact or refused with one clear error.

For each, a tiny random model built generically from its config class (tests/zoo_configs.py: windows of 6
tokens, strong soft-caps, one layer of each kind). onepass's start-up check (train.check) chooses packed
rows or one conversation per forward, with which onepass's per-token log-probabilities equal the model's
own forward, or refuses the model with a OnepassError; any other exception is a bug. Then (slow) the
training gradients equal those of the model's own loss, and greedy generation through onepass equals the
model's own `generate`, token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo_configs
from onepass.data.types import Example
from onepass.errors import OnepassError
from onepass.train.batch import collate
from onepass.train.check import own_forward_logprobs
from onepass.train.handle import check_model, prepare_model
from onepass.train.loss import sft_loss
from onepass.train.attention import PACKED, SEPARATE, own_attention, packing_of

# The refusals, by kind (the README lists them). A new refusal, or a refused model that becomes exact, is a
# change this test makes visible.
REFUSED = {
    "hyperclovax": "output tail: logits times logits_scaling (Granite's key, which divides)",
    "modernbert-decoder": "output tail: a prediction head (dense, activation, norm) before the output layer",
}
# Where the model's own forward gives a token another log-probability on the whole sequence than on a
# prefix that ends after it: sparse-attention indexers pick their keys by the sequence's width, CPM-Ant's
# positions depend on its length. The check says so; scoring then computes each turn from its own prefix.
NOT_PREFIX_CONSISTENT = {"axk2", "cpmant", "deepseek_v32", "deepseek_v4", "dots3_note_text", "glm_moe_dsa", "hy_v4"}
# Where one packed row differs from the model's own forward, each conversation runs alone (still exact):
# state-space, convolution and linear-attention layers carry one conversation into the next, ALiBi and
# older attention classes do not take onepass's packed attention, and a few attention variants (chunked,
# sparse, dynamic masks) are not what the packed attention computes.
ARCHITECTURES = zoo_configs.architectures()


def conversations(vocab: int, seed: int = 1) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(3, vocab, n).astype(np.int32), np.ones(n, np.int8), np.zeros(n, np.int32))
            for n in (13, 9, 17)]  # longer than the windows of 6


def checked(name: str):
    """The tiny model, prepared for scoring (the default accelerations) and through onepass's start-up
    check: (handle, result), or (None, error) when refused."""
    handle = prepare_model(zoo_configs.build(name))
    try:
        return handle, check_model(handle).check
    except OnepassError as error:
        return None, error


def test_the_zoo_covers_the_decoder_only_text_architectures_of_transformers():
    assert len(ARCHITECTURES) >= 100
    for name in ("llama", "mistral", "qwen3", "qwen3_5_text", "qwen3_5_moe_text", "gemma2", "gemma3_text",
                 "gemma4_text", "mamba", "jamba", "falcon_h1", "bloom", "gpt_oss", "deepseek_v3", "llama4_text"):
        assert name in ARCHITECTURES, name
    assert set(REFUSED) <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_is_exact_in_scoring_or_refused_with_one_clear_error(name):
    handle, result = checked(name)
    if name in REFUSED:
        assert handle is None, f"{name} is now exact ({result.describe()}): take it out of REFUSED and the README"
        assert "\n" not in str(result) and "Fix:" in str(result)
        return
    assert handle is not None, f"{name} refused: {result}"
    model = handle.model
    assert result.packing in (PACKED, SEPARATE) and result.max_difference <= 2e-4
    assert result.prefix_consistent is (name not in NOT_PREFIX_CONSISTENT), result.describe()
    assert ("prefix-consistent: yes" in result.describe()) is result.prefix_consistent
    # the scoring path on other conversations than the check's, in the packing the check chose
    from onepass.score.scoring import token_logprobs

    examples = conversations(zoo_configs.VOCAB)
    scored = np.concatenate(token_logprobs(model, examples, head_loss=handle.head_loss))
    np.testing.assert_allclose(scored, own_forward_logprobs(model, examples), rtol=0, atol=2e-4)


def own_loss_gradients(model, examples) -> dict[str, torch.Tensor]:
    """Gradients of the summed next-token NLL of every conversation alone, from the model's own forward's
    logits (its `loss` is the same sum where it has one; CPM-Ant's is not)."""
    model.zero_grad(set_to_none=True)
    with own_attention(model):
        for example in examples:
            ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in REFUSED])
def test_every_exact_architecture_trains_with_the_gradients_of_its_own_loss(name):
    model = checked(name)[0].model  # in eval mode (dropout off, modules or functional): both passes one function
    examples = conversations(zoo_configs.VOCAB)
    expected = own_loss_gradients(model, examples)
    model.zero_grad(set_to_none=True)
    batch = collate(examples)
    sft_loss(model, batch, 1.0)[0].backward()  # denominator 1: the sum of every trained token's NLL
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for key, grad in expected.items():  # to fp32 rounding of the tensor's scale (sums reordered by packing)
        difference = (got[key] - grad).abs().max().item()
        assert difference <= 1e-4 * grad.abs().max().item() + 1e-6, f"{name} ({packing_of(model)}): {key} {difference}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in REFUSED])
def test_every_exact_architecture_generates_the_greedy_reply_of_its_own_generate(name):
    """onepass's generation (`score.chat.generate`: what chat, eval_samples and the demos run) on the model
    in its training mode (packed attention or one conversation per forward) equals the model's own
    `generate` on a copy onepass never touched."""
    from onepass.score.chat import generate

    reference = zoo_configs.build(name)  # the same weights, never touched by onepass
    model = checked(name)[0].model
    for each in (reference, model):  # twelve tokens each, whatever a random model says first
        each.generation_config.eos_token_id = None
    prompt = torch.from_numpy(conversations(zoo_configs.VOCAB, seed=3)[2].input_ids.astype(np.int64))[None]
    with torch.no_grad():
        expected = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                      do_sample=False, pad_token_id=0)
    got = generate(model, prompt, stops=[], max_new_tokens=12)
    assert got == expected[0, prompt.shape[1]:].tolist()
