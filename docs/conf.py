"""
Sphinx configuration for pyro-wakesleep's documentation.

The source folder is the repository's root, so that the Markdown pages (the README, the pages
under docs/, the tutorials' README, the changelog and the contributing guide) link to each
other, to the examples and to the figures by the same relative paths on GitHub and in the
built site. Only the files in ``include_patterns`` are pages. Build from the repository root:

    python -m sphinx -W -c docs . build/docs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro_wakesleep  # noqa: E402

project = "pyro-wakesleep"
author = "pyro-wakesleep developers"
copyright = "2026, pyro-wakesleep developers"
release = pyro_wakesleep.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "docs/index"
include_patterns = [
    "README.md",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "tutorials/README.md",
    "docs/*.md",
    "docs/*.rst",
]
# Folders never walked for pages (the include patterns above would skip their files anyway).
exclude_patterns = [
    ".*",
    "**/.*",
    "build",
    "dist",
    "runs",
    "venv",
    "env",
    "tests",
    "benchmarks",
    "examples",
    "pyro_wakesleep",
    "docs/_build",
    "docs/benchmarks",
    "docs/figures",
    "**/__pycache__",
    "*.egg-info",
]

# Markdown: GitHub-style anchors for headings down to ###, so that links such as
# docs/guide.md#checkpoints-and-faults work in both places; $...$ maths as on GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# The API reference: members in source order, reST field lists as the docstrings write them.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
# A method that overrides torch's or Pyro's without a docstring of its own (BernoulliUnits.expand,
# say) is left out rather than shown with the parent's docstring, which is not ours to fix.
autodoc_inherit_docstrings = False
# No network: the build must work offline (no intersphinx inventories are fetched).

html_theme = "alabaster"
html_title = f"pyro-wakesleep {release}"
# The site's front page: a redirect from index.html to docs/index.html.
html_extra_path = ["_root"]  # relative to this folder


def _option(options, name):
    """A directive option's value, whichever way this Sphinx version hands options over."""
    value = getattr(options, name, None)
    if value is None and hasattr(options, "get"):
        value = options.get(name) or options.get(name.replace("_", "-"))
    return value


def _skip_reexported(app, what, name, obj, skip, options):
    """
    Document an object once, under the name users import: an object that the package
    re-exports (``pyro_wakesleep.WakeSleep``) has its own entry in the package's section of
    api.rst and is skipped in the section of the module that defines it (an ``automodule``
    given ``:imported-members:`` keeps it).
    """
    if what != "module" or _option(options, "imported_members"):
        return None
    if any(obj is getattr(pyro_wakesleep, n) for n in pyro_wakesleep.__all__):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_reexported)
