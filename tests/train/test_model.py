"""Model helpers: evaluation mode is scoped and always restored."""

from __future__ import annotations

import pytest
import torch

from onepass.demo.tiny import build_model
from onepass.train.model import evaluating


def test_evaluating_restores_training_mode_even_when_the_block_raises():
    model = build_model(None, vocab_size=64)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(model):
            assert not model.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with evaluating(model):
        pass
    assert not model.training  # back to the mode it was in, not to training
