"""The README's two commands: one installs the app, one the tests; neither pulls a CUDA torch over a CPU
build that is already there."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(section: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.DOTALL)


def _commands(block: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readme_installs_the_app_in_a_venv_and_the_tests_with_their_tools():
    install = _commands(_bash_blocks("Install and run")[0])
    assert install[0].startswith("python3 -m venv .venv") and "pip install -r requirements.txt" in install
    tests = _commands(_bash_blocks("Tests and benchmarks")[0])
    assert tests == ["pip install -r requirements-dev.txt", "python -m pytest -q tests"]
    dev = (ROOT / "requirements-dev.txt").read_text().split()
    assert dev[:2] == ["-r", "requirements.txt"] and any(line.startswith("pytest==") for line in dev)


def test_the_torch_requirement_keeps_the_installed_build():
    """pip, asked for requirements.txt's torch with the machine's indexes, picks the torch already here (the
    local CPU build on this machine), not a newer CUDA build from PyPI."""
    spec = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch"))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                             "--quiet", "--report", "-", spec], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.skip(f"pip cannot reach a package index here: {result.stderr.strip()[-200:]}")
    chosen = [item["metadata"]["version"] for item in json.loads(result.stdout)["install"]]
    assert chosen == [torch.__version__]
