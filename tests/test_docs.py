"""The documentation site builds, cites only files the repository holds, and its layout matches the tree."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository paths as code and docs cite them: `tests/test_bounds.py`, docs/method.md, ...
CITED_PATH = re.compile(
    r"(?<![\w/.])((?:mlflow_tabcons|plugins|tests|benchmarks|docs|requirements|\.ci)/[\w./-]*\.(?:py|md|json|yaml|yml|txt|csv|png))"
)
LAYOUT_MARKER = "<!-- layout: tests/test_docs.py checks that this list matches the tree -->"


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", ROOT / "MLproject", ROOT / "Makefile"]
    for folder, pattern in [("docs", "*.md"), ("mlflow_tabcons", "*.py"), ("plugins", "*.py"), ("tests", "*.py"), ("benchmarks", "*.py")]:
        files += sorted((ROOT / folder).rglob(pattern))
    return [path for path in files if path.is_file()]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "method" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "empirical_bernstein_lcb" in api  # the reference really came from the docstrings


def test_every_cited_file_exists() -> None:
    missing = []
    for path in _text_files():
        for cited in CITED_PATH.findall(path.read_text(errors="replace")):
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)


def test_nothing_cites_a_method_file_outside_the_repository() -> None:
    citing = [str(path.relative_to(ROOT)) for path in _text_files() if "METHOD" + ".md" in path.read_text(errors="replace")]
    assert not citing, f"cite docs/method.md instead in: {citing}"


def _layout_block() -> list[str]:
    text = (ROOT / "docs" / "development.md").read_text()
    assert LAYOUT_MARKER in text, "docs/development.md lost its layout marker"
    block = text.split(LAYOUT_MARKER, 1)[1].split("```", 2)[1]
    return block.splitlines()[1:]


def _layout_paths(lines: list[str]) -> set[str]:
    """Rebuild full paths from the indented tree: `  data/` then `    tables.py` -> mlflow_tabcons/data/tables.py."""
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = "".join(part for _, part in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        else:
            paths.add(full)
    return paths


def test_layout_section_matches_the_tree() -> None:
    documented = _layout_paths(_layout_block())
    actual = {
        str(path.relative_to(ROOT))
        for folder in ("mlflow_tabcons", "plugins")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert documented == actual, (
        "docs/development.md's layout differs from the tree: "
        f"not documented {sorted(actual - documented)}, documented but absent {sorted(documented - actual)}"
    )
