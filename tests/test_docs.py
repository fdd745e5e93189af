"""
The documentation builds and stays true: Sphinx builds the pages and the API reference with
every warning an error, the README's quickstart runs, the API reference documents every name
the package exports, and the README stays a front page.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pyro_wakesleep

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 8500


def test_docs_build_without_warnings(tmp_path):
    """``python -m sphinx -W -c docs . OUT``, as CONTRIBUTING.md says, offline and into a
    temporary folder: a docstring that is not valid reStructuredText, a broken link between the
    Markdown pages or a page outside every table of contents fails here."""
    warnings = tmp_path / "warnings.txt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-c",
            str(ROOT / "docs"),
            "-d",
            str(tmp_path / "doctrees"),
            "-w",
            str(warnings),
            str(ROOT),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = warnings.read_text() if warnings.exists() else ""
    assert result.returncode == 0 and not text.strip(), (
        f"sphinx failed:\n{text.strip() or result.stderr[-4000:]}"
    )
    api = (tmp_path / "html" / "docs" / "api.html").read_text()
    assert 'id="pyro_wakesleep.WakeSleep"' in api
    assert (tmp_path / "html" / "index.html").exists()  # the redirect to docs/index.html


def test_api_reference_has_every_exported_name():
    """Each name in ``pyro_wakesleep.__all__`` (modules aside) has its own entry in the package's
    section of docs/api.rst; otherwise it would be documented nowhere, since conf.py leaves
    re-exported objects out of their modules' sections."""
    text = (ROOT / "docs" / "api.rst").read_text()
    entries = set(re.findall(r"^\.\. auto(?:class|function|exception|data):: (\w+)$", text, re.M))
    exported = {
        name
        for name in pyro_wakesleep.__all__
        if not isinstance(getattr(pyro_wakesleep, name), type(pyro_wakesleep))
    }
    assert exported <= entries, f"missing from docs/api.rst: {sorted(exported - entries)}"


def readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart") :]
    block = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert block, "README.md's quickstart must hold a python code block"
    return block.group(1)


def test_readme_quickstart_runs():
    """The quickstart's code, as the README shows it, trains without error."""
    namespace: dict = {"__name__": "readme_quickstart"}
    exec(compile(readme_quickstart(), "README.md (quickstart)", "exec"), namespace)
    losses = namespace["losses"]
    assert type(losses).__name__ == "WakeSleepLosses"
    assert math.isfinite(losses.wake_theta) and math.isfinite(losses.phi)


def test_readme_is_a_front_page():
    """About 8 kB: the reference material lives in docs/, linked from the README."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md has {size} bytes; move detail into docs/"
