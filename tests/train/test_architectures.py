"""Every decoder architecture people fine-tune, computed as the model itself computes it.

For each, a tiny model built from its config, with attention windows shorter than the test
conversations: onepass's packed per-token log-probabilities (the training loss path and the scoring
path) equal the model's own forward with eager attention on each conversation alone (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass.data.types import Example
from onepass.score.scoring import token_logprobs
from onepass.train.batch import collate
from onepass.train.loss import label_nll
from onepass.train.attention import use_packed_attention

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def configs() -> dict[str, object]:
    import transformers as t

    window = dict(sliding_window=6)
    return {
        "llama": t.LlamaConfig(**SMALL),
        "mistral-sliding-window": t.MistralConfig(**SMALL, **window),
        "qwen2": t.Qwen2Config(**SMALL),
        "qwen2-sliding-window": t.Qwen2Config(**SMALL, use_sliding_window=True, max_window_layers=1, **window,
                                              layer_types=["sliding_attention", "full_attention"]),
        "qwen3": t.Qwen3Config(**SMALL, head_dim=8),
        "gemma": t.GemmaConfig(**SMALL, head_dim=8),
        "gemma2": t.Gemma2Config(**SMALL, head_dim=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                 **window),
        "gemma3": t.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window_pattern=2, final_logit_softcapping=3.0,
                                     layer_types=["sliding_attention", "full_attention"], **window),
        "phi3-sliding-window": t.Phi3Config(**SMALL, pad_token_id=0, **window),
        "cohere": t.CohereConfig(**SMALL, logit_scale=0.5),
        "granite": t.GraniteConfig(**SMALL, logits_scaling=4.0, attention_multiplier=0.3, residual_multiplier=0.5,
                                   embedding_multiplier=2.0),
        "olmo2": t.Olmo2Config(**SMALL),
    }


def build(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[name], dtype=torch.float32)
    with torch.no_grad():  # some models start with zero norms or tiny weights: make every path matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def conversations(seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    examples = []
    for length in (13, 9, 17):  # longer than the window of 6
        mask = np.ones(length, dtype=np.int8)
        examples.append(Example(rng.integers(3, VOCAB, length).astype(np.int32), mask, np.zeros(length, np.int32)))
    return examples


def own_forward_logprobs(model, examples: list[Example]) -> np.ndarray:
    """log Pr(token t | tokens < t), t >= 1, from the model's own forward, each conversation alone."""
    model.set_attn_implementation("eager")
    values = []
    with torch.no_grad():
        for example in examples:
            ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            values.append(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].numpy())
    return np.concatenate(values)


@pytest.mark.parametrize("name", sorted(configs()))
def test_packed_log_probs_equal_the_models_own_forward_on_each_conversation_alone(name):
    model = build(name)
    examples = conversations()
    expected = own_forward_logprobs(model, examples)
    use_packed_attention(model)
    with torch.no_grad():
        nll, _ = label_nll(model, collate(examples))  # the training path: all three in one packed row
    np.testing.assert_allclose(-nll.double().numpy(), expected, rtol=0, atol=1e-5)
    scored = np.concatenate(token_logprobs(model, examples))  # the scoring path
    np.testing.assert_allclose(scored, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(configs()))
def test_lean_activations_give_every_architecture_the_same_loss_and_gradients(name):
    """Norms and MLPs that keep fewer tensors for backward (where their arithmetic is Llama's) change
    nothing the loss or the optimizer sees."""
    from onepass.accel.lean_activations import lean_activations

    batch = collate(conversations())
    results = []
    for lean in (False, True):
        model = use_packed_attention(build(name).train())
        if lean:
            lean_activations(model)
        nll, _ = label_nll(model, batch)
        nll.sum().backward()
        results.append((nll.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_nll, plain_grads), (lean_nll, lean_grads) = results
    assert torch.equal(plain_nll, lean_nll)
    assert plain_grads.keys() == lean_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[key], grad, rtol=1e-5, atol=1e-6)
