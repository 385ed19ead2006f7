"""`make demo-real`: the real model learns the habit its training answers share."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real


def test_after_a_few_lora_steps_held_out_replies_open_with_the_trained_habit(tmp_path):
    from onepass.demo.real import HELD_OUT_PROMPTS, run_real_demo

    report = run_real_demo(tmp_path / "demo-real", steps=30, progress=False)
    assert report["opens_with_habit_before"] == 0
    assert report["opens_with_habit_after"] >= len(HELD_OUT_PROMPTS) - 1
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert (tmp_path / "demo-real" / "loss.png").exists() and (tmp_path / "demo-real" / "final").is_dir()
