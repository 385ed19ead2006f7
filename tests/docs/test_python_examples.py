"""The Python examples of the README and docs/python.md run as written, each page in a fresh interpreter,
on a tiny model and tokenizer the test builds where `make demo` puts its base model; afterwards the
user's model runs its own attention and carries nothing of onepass's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onepass.demo.tiny import build_model, build_tokenizer

ROOT = Path(__file__).parents[2]

# Appended to each page's code: what the library promises about the user's model after it returns
AFTERWARDS = """
from onepass.train.attention import is_packing_attention

assert not is_packing_attention(model.config._attn_implementation), model.config._attn_implementation
assert model.config._attn_implementation == ORIGINAL_ATTENTION
left = [(name, key) for name, module in model.named_modules() for key in vars(module) if "onepass" in key.lower()]
assert not left, left
assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
print("AFTERWARDS OK")
"""


def python_blocks(page: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))


@pytest.fixture
def demo_base_model(tmp_path):
    """A tiny tokenizer and model in runs/demo/base_model, as `make demo` leaves them."""
    base = tmp_path / "runs" / "demo" / "base_model"
    tokenizer = build_tokenizer(base, extra_text=["hi, i am ada and i like tea. nice to meet you, ada."])
    build_model(base, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    return tmp_path


@pytest.mark.parametrize("page", ["README.md", "docs/python.md"])
def test_the_python_examples_run_as_written_and_leave_the_model_as_it_came(demo_base_model, page):
    code = python_blocks(ROOT / page)
    assert "import onepass" in code or "onepass." in code
    # the model's attention as loaded, recorded right after the page loads it
    code = re.sub(r"(model = AutoModelForCausalLM\.from_pretrained\([^)]*\)\n)",
                  r"\1ORIGINAL_ATTENTION = model.config._attn_implementation\n", code, count=1)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code + AFTERWARDS], cwd=demo_base_model, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "AFTERWARDS OK" in result.stdout
