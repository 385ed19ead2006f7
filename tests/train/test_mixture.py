"""Weighted dataset mixing: each source's examples appear weight times per epoch (fractions: a fresh
random part each epoch), deterministic in (seed, epoch), and the reported shares are the realised ones."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from onepass.config import DataSource, load_config
from onepass.data.types import Example
from onepass.errors import ConfigError
from onepass.train.mixture import Mixture, describe
from onepass.train.plan import StepPlan

from conftest import make_config, trained, write_jsonl
from onepass.demo.tiny import random_conversations


def examples_of(source: str, count: int, length: int, trained: int) -> list[Example]:
    mask = np.zeros(length, dtype=np.int8)
    mask[-trained:] = 1
    return [Example(np.full(length, 5 + i, dtype=np.int32), mask, np.where(mask == 1, 0, -1).astype(np.int32),
                    source=source, where=f"line {i + 1}") for i in range(count)]


SOURCES = [DataSource("short.jsonl", 3.0), DataSource("long.jsonl", 0.5), DataSource("plain.jsonl")]


@pytest.fixture
def data():
    return examples_of("short.jsonl", 10, 8, 2) + examples_of("long.jsonl", 12, 30, 20) + \
        examples_of("plain.jsonl", 6, 12, 6)


def trained_in_epoch(plan: StepPlan, epoch: int) -> list[int]:
    return [i for step in plan.epoch(epoch) for micro in step for i in micro]


def test_each_source_appears_weight_times_per_epoch_and_the_shares_reported_are_the_realised_ones(data):
    mixture = Mixture(data, SOURCES)
    plan = StepPlan(data, max_seq_len=64, batch_size=1, grad_accum=1, seed=0, normalization="token", mixture=mixture)
    for epoch in range(3):
        seen = trained_in_epoch(plan, epoch)
        by_source = Counter(data[i].source for i in seen)
        assert by_source == {"short.jsonl": 30, "long.jsonl": 6, "plain.jsonl": 6}
        assert Counter(i for i in seen if data[i].source == "short.jsonl") == {i: 3 for i in range(10)}
        assert max(Counter(seen).values()) == 3
        shares = {s.source.path: s for s in mixture.shares()}
        assert shares["short.jsonl"].record_share == pytest.approx(30 / 42)
        tokens = Counter()
        for i in seen:
            tokens[data[i].source] += data[i].num_trained_tokens
        for path, share in shares.items():  # exact here: the fraction takes 6 of 12 equally long examples
            assert share.trained_token_share == pytest.approx(tokens[path] / sum(tokens.values()))
    # the half of long.jsonl changes between epochs, and the plan is a function of (seed, epoch)
    halves = [frozenset(i for i in trained_in_epoch(plan, e) if data[i].source == "long.jsonl") for e in range(4)]
    assert len(set(halves)) > 1
    again = StepPlan(data, max_seq_len=64, batch_size=1, grad_accum=1, seed=0, normalization="token",
                     mixture=Mixture(data, SOURCES))
    assert [again.epoch(e) for e in range(3)] == [plan.epoch(e) for e in range(3)]
    assert plan.total_steps(3) == sum(len(plan.epoch(e)) for e in range(3))
    assert plan.locate(plan.epoch_steps(0)) == (1, 0)
    assert "short.jsonl: weight 3, 10 examples → 30 per epoch = 71.4% of examples" in describe(mixture.shares())


def test_weighted_sources_are_written_beside_plain_paths_and_checked(tmp_path):
    config = load_config(None, ["model=m", "data.train=[a.jsonl, {path: b.jsonl, weight: 3}]"])
    assert [(s.path.split("/")[-1], s.weight) for s in config.data.sources()] == [("a.jsonl", 1.0), ("b.jsonl", 3.0)]
    with pytest.raises(ConfigError, match="unknown config key 'data.train\\[0\\].wieght'"):
        load_config(None, ["model=m", "data.train=[{path: b.jsonl, wieght: 3}]"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(None, ["model=m", "data.train=[{path: b.jsonl, weight: 0}]"])


def test_a_weighted_run_reports_each_sources_share_of_examples_and_trained_tokens(run_assets, tmp_path, capsys):
    extra = write_jsonl(tmp_path / "extra.jsonl", random_conversations(12, seed=5, max_turns=1))
    config = make_config(run_assets, tmp_path / "out", "max_steps=2")
    config.data.train = [config.data.train[0], DataSource(str(extra), 2.0)]
    trained(config).fit()
    err = capsys.readouterr().err
    assert "train mixture (per epoch):" in err
    assert f"{extra}: weight 2, " in err and "of trained tokens" in err
