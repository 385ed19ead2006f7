"""Config: YAML + overrides, validated with messages that name the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from onepass.config import load_config
from onepass.errors import ConfigError

BASE = ["model=m", "data.train=d.jsonl"]


def test_yaml_file_and_overrides_are_merged_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata:\n  train: d.jsonl\n  loss_on: last\nlr: 1e-4\nlora: {enabled: true, r: 4}\n")
    config = load_config(path, ["grad_accum=3", "data.loss_on=all"])
    assert config.lr == 1e-4 and config.grad_accum == 3 and config.data.loss_on == "all"
    assert config.lora.enabled and config.lora.r == 4
    assert config.data.train_paths() == [str(tmp_path / "d.jsonl")]  # relative to the config file


@pytest.mark.parametrize("override, message", [
    ("lrr=1", "unknown config key 'lrr'. Did you mean 'lr'?"),
    ("data.loss_onn=last", "unknown config key 'data.loss_onn'. Did you mean 'data.loss_on'?"),
    ("data.loss_on=first", "config key 'data.loss_on': 'first' is not allowed. Fix: use one of 'assistant', "
                           "'last', 'all'."),
    ("batch_size=two", "config key 'batch_size': expected an integer, got 'two'."),
    ("lr=-0.1", "config key 'lr': must be zero or more, got -0.1."),
    ("max_seq_len=0", "config key 'max_seq_len': must be positive, got 0."),
    ("gradient_checkpointing=maybe", "config key 'gradient_checkpointing': expected true or false, got 'maybe'."),
    ("lr", "override 'lr' is not of the form key=value"),
])
def test_bad_values_are_named_with_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, BASE + [override])
    assert message in str(caught.value)


def test_model_and_training_data_are_required():
    with pytest.raises(ConfigError, match="'model' is required"):
        load_config(None, ["data.train=d.jsonl"])
    with pytest.raises(ConfigError, match="'data.train' is required"):
        load_config(None, ["model=m"])
