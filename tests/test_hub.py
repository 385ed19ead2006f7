"""Hub ids wherever a model, tokenizer or data path is given, resolved offline from a Hub cache the test
lays out itself (`refs/main`, `snapshots/<commit>/...`, as `hf download` leaves it); no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from onepass.errors import OnepassError
from onepass.hub import dataset_files, local_or_hub

from conftest import chat, make_config, trained, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def snapshot(cache, repo_type, repo_id):
    """A repo's folder in the Hub cache layout (refs/main naming a snapshot)."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    folder = root / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, run_assets):
    root, tokenizer_dir, data, held_out = run_assets
    cache = tmp_path / "hub"
    model = snapshot(cache, "model", "org/tiny-chat")
    for source in (root / "model", tokenizer_dir):
        for file in source.iterdir():
            shutil.copy(file, model / file.name)
    dataset = snapshot(cache, "dataset", "org/chats")
    (dataset / "data").mkdir()
    shutil.copy(data, dataset / "data" / "train-00000-of-00001.jsonl")
    shutil.copy(held_out, dataset / "data" / "test-00000-of-00001.jsonl")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_model_id_is_its_snapshot_in_the_local_cache_offline(hub):
    from onepass.data.tokenizer import load_tokenizer
    from onepass.train.model import load_model

    folder = local_or_hub("org/tiny-chat")
    assert folder.name == COMMIT and (folder / "config.json").is_file()
    assert load_tokenizer("org/tiny-chat").name_or_path == str(folder)
    assert type(load_model("org/tiny-chat", "cpu")).__name__ == "LlamaForCausalLM"


def test_a_hub_dataset_gives_the_files_of_its_split(hub):
    assert [p.name for p in dataset_files("org/chats")] == ["train-00000-of-00001.jsonl"]
    assert [p.name for p in dataset_files("org/chats", split="test")] == ["test-00000-of-00001.jsonl"]
    with pytest.raises(OnepassError, match=r"org/chats: no data files for split 'validation' \(found: test, train\)"):
        dataset_files("org/chats", split="validation")


def test_an_id_that_is_not_in_the_cache_offline_is_one_error_naming_it(hub):
    with pytest.raises(OnepassError, match=r"^org/missing: not a local path, and the Hugging Face Hub model "
                                           r"org/missing could not be found or fetched .*Fix:"):
        local_or_hub("org/missing")


def test_a_run_trains_a_hub_model_on_a_hub_dataset_with_its_splits(hub, run_assets, tmp_path):
    config = make_config(run_assets, tmp_path / "out", "model=org/tiny-chat", "tokenizer=null",
                         "data.train=[org/chats]", "max_steps=2")
    config.data.eval = [type(config.data.sources()[0])("org/chats", split="test")]
    result = trained(config).fit()
    assert result.steps == 2 and (result.final_dir / "model.safetensors").is_file()


def test_inspect_takes_hub_ids_for_data_and_tokenizer(hub, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onepass", "inspect", "org/chats", "--tokenizer", "org/tiny-chat",
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all("input_ids" in json.loads(line) for line in result.stdout.splitlines())
    missing = subprocess.run([sys.executable, "-m", "onepass", "inspect", "org/none", "--tokenizer", "org/tiny-chat"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: org/none: not a local path")


def test_yaml_data_entries_name_a_split_subset_and_revision(tmp_path):
    from onepass.config import load_config

    (tmp_path / "c.yaml").write_text("model: org/model\ndata:\n  train: [{path: org/chats, split: train, subset: "
                                     "en, revision: v1}]\n  eval: [{path: org/chats, split: test}]\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.model == "org/model"
    [train], [held_out] = config.data.sources(), config.data.eval_sources()
    assert (train.path, train.split, train.subset, train.revision) == ("org/chats", "train", "en", "v1")
    assert (held_out.path, held_out.split) == ("org/chats", "test")


def test_split_names_match_whole_and_subsets_must_be_named_where_a_split_has_several(hub, tmp_path):
    ultra = snapshot(hub, "dataset", "org/ultra")
    (ultra / "data").mkdir()
    for name in ("train_sft-00000-of-00001.jsonl", "train_gen-00000-of-00001.jsonl", "test_sft-00000-of-00001.jsonl"):
        write_jsonl(ultra / "data" / name, [chat("q", "a")])
    assert [p.name for p in dataset_files("org/ultra", split="train_sft")] == ["train_sft-00000-of-00001.jsonl"]
    with pytest.raises(OnepassError, match="no data files for split 'train'"):
        dataset_files("org/ultra")  # train_sft and train_gen are other splits, not parts of `train`
    talk = snapshot(hub, "dataset", "org/talk")
    for subset in ("all", "smol-magpie"):
        (talk / "data" / subset).mkdir(parents=True)
        write_jsonl(talk / "data" / subset / "train-00000-of-00001.jsonl", [chat("q", "a")])
    with pytest.raises(OnepassError, match=r"several subsets \(all, smol-magpie\).*subset: all"):
        dataset_files("org/talk")
    assert [p.parent.name for p in dataset_files("org/talk", subset="all")] == ["all"]
    only_test = snapshot(hub, "dataset", "org/held-out")
    write_jsonl(only_test / "test.jsonl", [chat("q", "a")])
    with pytest.raises(OnepassError, match=r"no data files for split 'train' \(found: test\)"):
        dataset_files("org/held-out")  # a test-only repo is never trained on by default


def test_a_mistyped_data_file_is_a_missing_path_not_a_hub_lookup(tmp_path):
    from onepass.hub import is_hub_id

    assert not is_hub_id("data/train.jsonl") and is_hub_id("org/name") and is_hub_id("org/data.v2")
