"""`onepass demo`: the built-in job runs end to end and the model learns the multi-turn task."""

from __future__ import annotations

import json

import pytest

from onepass.demo.run import make_dialogues, run_demo


def test_later_answers_depend_on_the_first_turn():
    for dialogue in make_dialogues(20, seed=3):
        first_user = dialogue["messages"][0]["content"]
        for message in dialogue["messages"][3::2]:
            assert message["content"].rstrip(".").split()[-1] in first_user


def test_demo_writes_model_metrics_plot_and_report(tmp_path):
    report = run_demo(tmp_path, steps=5, num_train=60, num_eval=3, progress=False)
    for name in ("final/model.safetensors", "metrics.jsonl", "loss.png", "eval.json"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved) >= {"before", "after"} and len(saved["after"]["per_turn"]) == 3
    assert saved == json.loads(json.dumps(report))


@pytest.mark.slow
def test_demo_accuracy_rises_from_near_zero_to_well_above_half(tmp_path):
    report = run_demo(tmp_path, progress=False)
    assert report["before"]["accuracy"] < 0.1
    assert report["after"]["accuracy"] > 0.6
    assert min(report["after"]["per_turn"]) > 0.5
