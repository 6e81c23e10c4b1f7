"""The import rules of the project: wgp.py -> models -> shared, and models/anima drops into upstream Wan2GP."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_shared_never_imports_models_or_the_app():
    for path in (ROOT / "shared").rglob("*.py"):
        assert not top_level(imported_modules(path)) & {"models", "wgp"}, path


def test_the_anima_family_needs_only_shared_attention_from_the_host():
    for path in (ROOT / "models").rglob("*.py"):
        imports = imported_modules(path)
        assert "wgp" not in top_level(imports), path
        assert {name for name in imports if name.split(".")[0] == "shared"} <= {"shared.attention"}, path
        assert "diffusers" not in top_level(imports), path  # a test-only reference


def test_importing_the_family_pulls_in_no_ui():
    code = ("import sys, models.anima.anima_handler, models.anima.anima_main; "
            "print(sorted(m for m in ('gradio', 'diffusers', 'wgp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
