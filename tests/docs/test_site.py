"""The documentation site: formulas render, code fits the page, no page repeats its title, a diagram of the parts,
every page in the navigation; and ``mkdocs build --strict`` turns the math and the diagram into what the browser
renders (MathJax's ``arithmatex`` spans, Material's ``mermaid`` blocks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


class _Loader(yaml.SafeLoader):
    """mkdocs.yml's ``!!python/name:`` tags read as plain strings (nothing imported)."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)


def mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_math_diagrams_and_code_width_are_configured():
    config = mkdocs_config()
    extensions = {next(iter(e)) if isinstance(e, dict) else e: (e[next(iter(e))] if isinstance(e, dict) else None)
                  for e in config["markdown_extensions"]}
    assert extensions["pymdownx.arithmatex"] == {"generic": True}
    fences = extensions["pymdownx.superfences"]["custom_fences"]
    assert {"name": "mermaid", "class": "mermaid", "format": "pymdownx.superfences.fence_code_format"} in fences
    assert "javascripts/mathjax.js" in config["extra_javascript"]
    assert any(script.endswith("/es5/tex-mml-chtml.js") for script in config["extra_javascript"])
    for path in [*config["extra_javascript"], *config["extra_css"]]:
        assert "://" in path or (DOCS / path).is_file(), path
    css = (DOCS / "stylesheets" / "extra.css").read_text()
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css)  # long code lines wrap, never clipped
    assert re.search(r"td code,[^{]*\{[^}]*word-break: keep-all", css)  # a name in a table never breaks inside


def test_every_page_is_in_the_navigation_and_none_repeats_its_title():
    nav = set(_nav_pages(mkdocs_config()["nav"]))
    assert "own-data.md" in nav
    for page in sorted(DOCS.rglob("*.md")):
        name = str(page.relative_to(DOCS))
        text = page.read_text()
        title = re.search(r"^# (.+)$", text, re.M)
        first_section = re.search(r"^## (.+)$", text, re.M)
        if title and first_section:
            assert first_section.group(1).strip() != title.group(1).strip(), f"{name} repeats its title"
        if not name.startswith("benchmark-results/") and name != "docs-conventions.md":
            assert name in nav or name.startswith("reference/"), f"{name} is not in mkdocs.yml's nav"


def test_the_home_page_has_a_diagram_of_the_parts_and_the_formulas_are_math():
    index = (DOCS / "index.md").read_text()
    diagram = index[index.index("```mermaid"):]
    for part in ("ParquetDataModule", "MultiTaskLightningModule", "lightning.Trainer", "weighting", "ONNX"):
        assert part in diagram[: diagram.index("\n```\n")], part
    cvr = (DOCS / "cvr.md").read_text()
    assert "L_{\\mathrm{IPS}}" in cvr and "L_{\\mathrm{DR}}" in cvr and "L_{\\mathrm{CVR}}" in cvr
    assert "`1/|D| Σ" not in cvr  # no formula left as code


@pytest.mark.skipif(sys.platform == "win32", reason="the build's paths")
def test_the_site_builds_strictly_with_rendered_math_and_diagrams(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    cvr = (site / "cvr" / "index.html").read_text()
    assert cvr.count('class="arithmatex"') >= 5 and "\\frac{1}{|D|}" in cvr
    assert '<pre class="mermaid"><code>flowchart LR' in (site / "index.html").read_text()
    assert (site / "own-data" / "index.html").is_file()
