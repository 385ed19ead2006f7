"""Tree examples: one pass over a tree computes, for every node, exactly what its root-to-node path
computes alone; packed trees equal trees alone; a tree's loss and gradients equal the per-turn split
examples'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass.data.tree import TokenPath, merge_paths, tree_example
from onepass.data.types import Example
from onepass.demo.tiny import build_model
from onepass.train.batch import collate
from onepass.train.forward import hidden_states
from onepass.train.loss import sft_loss
from onepass.train.attention import use_packed_attention

VOCAB = 100


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return use_packed_attention(build_model(None, vocab_size=VOCAB)).eval()


def random_paths(rng: np.random.Generator, count: int) -> list[TokenPath]:
    """Paths that share random prefixes with earlier ones, each training a tail of its own (one turn each)."""
    paths = []
    for turn in range(count):
        if paths and rng.random() < 0.8:
            base = paths[rng.integers(len(paths))].input_ids
            prefix = base[:rng.integers(1, len(base) + 1)]
        else:
            prefix = rng.integers(3, VOCAB, rng.integers(2, 6)).astype(np.int32)
        tail = rng.integers(3, VOCAB, rng.integers(2, 8)).astype(np.int32)
        ids = np.concatenate([prefix, tail]).astype(np.int32)
        mask = np.zeros(len(ids), np.int8)
        mask[len(prefix):] = 1
        paths.append(TokenPath(ids, mask, np.where(mask == 1, turn, -1).astype(np.int32)))
    return paths


def path_logits(model, ids: np.ndarray) -> torch.Tensor:
    example = Example(ids.astype(np.int32), np.ones(len(ids), np.int8), np.zeros(len(ids), np.int32))
    return model.lm_head(hidden_states(model, collate([example]))[0])


@pytest.mark.parametrize("seed", range(4))
def test_every_nodes_logits_equal_its_root_to_node_path_run_alone(model, seed):
    rng = np.random.default_rng(seed)
    tree = merge_paths(random_paths(rng, 4))
    example = tree_example(tree)
    assert example.is_tree
    with torch.no_grad():
        logits = model.lm_head(hidden_states(model, collate([example]))[0])
        for path, nodes in zip(random_paths(np.random.default_rng(seed), 4), tree.paths):
            np.testing.assert_array_equal(example.input_ids[nodes], path.input_ids)
            torch.testing.assert_close(logits[nodes], path_logits(model, path.input_ids), rtol=0, atol=1e-5)


def test_a_packed_row_of_trees_and_sequences_equals_each_alone(model):
    rng = np.random.default_rng(7)
    examples = [tree_example(merge_paths(random_paths(rng, 3))) for _ in range(3)]
    examples.insert(1, Example(rng.integers(3, VOCAB, 9).astype(np.int32), np.ones(9, np.int8), np.zeros(9, np.int32)))
    with torch.no_grad():
        packed = hidden_states(model, collate(examples))[0]
        alone = torch.cat([hidden_states(model, collate([e]))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def gradients(model, examples, normalization):
    batch = collate(examples, normalization)
    model.zero_grad()
    loss, _ = sft_loss(model, batch, batch.units)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("normalization", ["token", "turn"])
def test_a_trees_loss_and_gradients_equal_the_per_turn_split_examples(normalization):
    torch.manual_seed(1)
    model = use_packed_attention(build_model(None, vocab_size=VOCAB)).double()
    paths = random_paths(np.random.default_rng(3), 4)
    split = [Example(p.input_ids, p.loss_mask, p.turn) for p in paths]
    tree = tree_example(merge_paths(paths))
    assert len(tree) < sum(len(e) for e in split)  # shared prefixes are computed once
    tree_loss, tree_grads = gradients(model, [tree], normalization)
    split_loss, split_grads = gradients(model, split, normalization)
    torch.testing.assert_close(tree_loss, split_loss, rtol=1e-9, atol=1e-12)
    for a, b in zip(tree_grads, split_grads):  # Llama's RMSNorm computes in fp32 even in an fp64 model
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sequence_normalisation_weighs_a_tree_as_one_conversation():
    torch.manual_seed(1)
    model = use_packed_attention(build_model(None, vocab_size=VOCAB)).double()
    paths = random_paths(np.random.default_rng(3), 4)
    split = [Example(p.input_ids, p.loss_mask, p.turn) for p in paths]
    tree = tree_example(merge_paths(paths))
    assert collate([tree], "sequence").units == 1
    tree_loss, _ = gradients(model, [tree], "sequence")
    conversation_loss, _ = gradients(model, split, "token")  # all its turns' tokens, averaged together
    torch.testing.assert_close(tree_loss, conversation_loss, rtol=1e-7, atol=0)  # loss weights are fp32


def test_n_completions_of_one_prompt_never_give_a_node_two_trained_children():
    prompt = np.array([5, 6, 7], np.int32)
    completions = [np.array([8, 9], np.int32), np.array([8, 10], np.int32), np.array([11], np.int32)]
    paths = [TokenPath(np.concatenate([prompt, c]), np.r_[np.zeros(3, np.int8), np.ones(len(c), np.int8)],
                       np.zeros(3 + len(c), np.int32)) for c in completions]
    tree = merge_paths(paths)
    trained = np.flatnonzero(tree.loss_mask == 1)
    assert len(set(tree.parent[trained].tolist())) == len(trained)  # one trained child per node
    for path, nodes in zip(paths, tree.paths):
        np.testing.assert_array_equal(tree.input_ids[nodes], path.input_ids)
        assert all(tree.parent[b] == a for a, b in zip(nodes[:-1], nodes[1:]))
