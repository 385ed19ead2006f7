"""The commands of the README and docs/ run as written, from a fresh checkout after `make demo`; the README
stays short."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def readme_commands() -> list[str]:
    """Every `.venv/bin/onepass ...` line inside the bash blocks of the README and of docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith(".venv/bin/onepass ")]


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert any(" inspect " in c for c in commands) and any(" train " in c for c in commands)
    assert any(" check " in c for c in commands)
    assert all("path/to" not in c and "[" not in c for c in commands), "README commands must run as written"


@pytest.mark.slow
def test_every_readme_command_runs_as_written_after_the_demo(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    onepass = [sys.executable, "-m", "onepass"]
    demo = subprocess.run([*onepass, "demo", "--output", "runs/demo", "--steps", "40"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr
    for command in readme_commands():
        argv = onepass + shlex.split(command)[1:]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


def test_the_readme_is_read_in_five_minutes_and_links_its_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).is_file(), link
