"""The README's options table and the glossary's names follow the code, so they cannot drift."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import fasttrak as ft

ROOT = Path(__file__).resolve().parents[1]


def options_table() -> dict[str, str]:
    """Option name -> default text of the README's table "Options of `ft.TRAK`"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Options of `ft.TRAK`", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 3 else None
        if match:
            rows[match.group(1)] = cells[1]
    return rows


def test_readme_options_table_lists_every_constructor_option_with_its_default():
    signature = inspect.signature(ft.TRAK)
    documented = options_table()
    options = [name for name in signature.parameters if name != "model"]
    assert sorted(documented) == sorted(options), "README options table vs ft.TRAK signature"
    for name in options:
        default = signature.parameters[name].default
        if default is None:
            continue  # decided later (e.g. "4 when k ≥ 1024"): described in words
        shown = documented[name].replace("`", "").strip('"')
        if isinstance(default, bool):
            assert shown == str(default), f"{name}: README says {documented[name]}, code {default}"
        elif isinstance(default, str):
            assert shown == default, f"{name}: README says {documented[name]}, code {default!r}"
        elif isinstance(default, (int, float)):
            assert float(shown) == float(default), f"{name}: README {shown}, code {default}"
        else:
            assert shown == type(default).__name__ + "()", f"{name}: README {shown}"


def test_glossary_names_exist_in_the_code():
    text = (ROOT / "docs" / "glossary.md").read_text()
    trak = ft.TRAK(__import__("torch").nn.Linear(3, 2), proj_dim=4, progress=False)
    for name in ("params", "param_numels", "layout", "estimator", "featurizer", "store", "model"):
        assert f"TRAK.{name}" in text and hasattr(trak, name), name
    for name in ("model_ids", "model"):
        assert hasattr(trak.store, name)
    assert hasattr(ft.Scores, "chunks") and hasattr(ft.Scores, "model_ids")
    for field in ("kernel", "kernel_blocks", "weight_power", "ensemble_size"):
        assert f"Estimator.{field}" in text and hasattr(ft.Estimator(), field)
