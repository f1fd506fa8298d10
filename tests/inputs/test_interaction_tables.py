"""The architecture tables of README.md and docs/architectures.md say which architectures take ``interaction=``:
``any`` where the class sets no ``interaction_refused``, ``none: ...`` where it does (docs: the class's reason)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtl_lightning import registry

ROOT = Path(__file__).resolve().parents[2]


def interaction_cells(text: str) -> dict[str, str]:
    """``{name: last cell}`` of the table rows that start with a registered name in backticks."""
    cells = {}
    for name, row in re.findall(r"^\| `(\w+)` (\|.*)\|$", text, re.M):
        if name in registry.names():
            cells[name] = row.rsplit("|", 1)[-1].strip()
    return cells


@pytest.mark.parametrize("page, heading", [("README.md", "## Architectures"), ("docs/architectures.md", "# Architectures")])
def test_tables_say_which_architectures_take_an_interaction(page, heading):
    text = (ROOT / page).read_text()
    text = text[text.index(heading + "\n"):]
    text = text[: text.index("\n## ", 1)]  # up to the next section
    cells = interaction_cells(text)
    assert set(cells) == set(registry.names())
    for name, cell in cells.items():
        refused = registry.get(name).interaction_refused
        if refused is None:
            assert cell == "any", f"{page}: {name} takes any interaction, the table says {cell!r}"
        else:
            assert cell.startswith("none: "), f"{page}: {name} refuses interactions ({refused}), the table says {cell!r}"
            if page.startswith("docs/"):
                assert cell == f"none: {refused}", f"{page}: {name}'s reason differs from interaction_refused"
