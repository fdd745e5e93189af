"""The project's own promises: CI runs the README's test command, the quickstart runs, the
repository is lint-clean."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- test-command -->\s*```bash\n(.*?)\n```\s*<!-- /test-command -->", text, re.S
    )
    assert block, "README.md must hold the test command between the test-command markers"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_test_command()
    assert "pytest" in command
    # torch is pinned before the package is installed, so pip never pulls a CUDA build.
    assert command.index("pip install torch==2.13.0") < command.index('pip install -e ".[test]"')
    extracted = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
            " | grep -v -e '<!--' -e '^```'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == command
    assert "sed -n '/<!-- test-command -->/" in (ROOT / ".ci/run").read_text()


def test_readme_first_command_trains_on_shipped_data():
    first = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert first.endswith("pip install -e . && pyro-wakesleep train")


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--steps", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "test log-likelihood estimate" in result.stdout
    assert "-2.376" in result.stdout  # minus the exact entropy of the bars distribution


def test_readme_figures_exist():
    text = (ROOT / "README.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert figures
    for figure in figures:
        assert (ROOT / figure).read_bytes().startswith(b"\x89PNG"), figure


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    """``ruff check .`` (the rules in pyproject.toml) and ``ruff format --check .`` (every
    Python file, notebook cell and Markdown code block) on the whole repository find nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean(tmp_path):
    """``mypy`` (the configuration in pyproject.toml: the package, Python 3.10) finds nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
