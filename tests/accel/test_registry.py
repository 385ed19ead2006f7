"""The accelerations registry: `auto` installs what was measured on this kind of device, `none` runs the
stock core, and the two train the same model to bf16 tolerance; the run says which were installed."""

from __future__ import annotations

import json

import pytest
import torch

from onepass import accel
from onepass.errors import OnepassError

from conftest import make_config, trained


def test_auto_installs_the_cpu_measured_accelerations_and_none_on_cuda_until_measured_there():
    assert accel.choose("auto", "cpu", bf16=True, checkpointing=False) == accel.NAMES
    assert "cast-once" not in accel.choose("auto", "cpu", bf16=False, checkpointing=False)
    assert "lean-activations" not in accel.choose("auto", "cpu", bf16=True, checkpointing=True)
    assert accel.choose("auto", "cuda", bf16=True, checkpointing=False) == ()
    assert accel.choose("none", "cpu", bf16=True, checkpointing=False) == ()
    assert accel.choose(["cast-once", "fused-loss"], "cuda", True, False) == ("fused-loss", "cast-once")
    with pytest.raises(OnepassError, match="accelerations': unknown 'fast-norm'. Fix: auto, none, or a list of"):
        accel.choose(["fast-norm"], "cpu", True, False)


@pytest.mark.parametrize("value, message", [("accelerations=3", "accelerations': unknown '3'"),
                                            ("accelerations=[fast-norm]", "unknown 'fast-norm'")])
def test_a_bad_accelerations_setting_is_one_error_when_the_config_loads(value, message):
    from onepass.config import load_config

    with pytest.raises(OnepassError, match=message):
        load_config(None, ["model=m", "data.train=d.jsonl", value])


def test_every_acceleration_names_what_it_replaces_its_proof_and_its_bench_script():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for entry in accel.REGISTRY:
        assert entry.replaces and entry.devices
        assert all((root / path.strip()).is_file() for path in entry.proof.split(","))
        assert (root / entry.measured_by).is_file()


@pytest.mark.skipif(not accel.choose("auto", "cpu", True, False), reason="no CPU accelerations")
def test_the_stock_core_and_the_accelerations_give_the_same_loss_curve_to_bf16_tolerance(run_assets, tmp_path,
                                                                                         capsys):
    curves = {}
    for setting in ("auto", "none"):
        run = trained(make_config(run_assets, tmp_path / setting, "max_steps=8", "precision=bf16",
                                  f"accelerations={setting}"))
        stderr = capsys.readouterr().err
        expected = "accelerations: none (cpu, bf16; the stock core)" if setting == "none" else \
            f"accelerations: {', '.join(accel.NAMES)} (cpu, bf16)"
        assert expected in stderr
        model = run.run.model
        from onepass.accel.lean_activations import _mlp_forward

        assert (model.model.layers[0].mlp.forward.__func__ is _mlp_forward) == (setting == "auto")
        run.fit()
        rows = [json.loads(line) for line in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        curves[setting] = [r["loss"] for r in rows if "loss" in r]
    assert len(curves["auto"]) == 8
    torch.testing.assert_close(curves["none"], curves["auto"], rtol=2e-2, atol=0)
