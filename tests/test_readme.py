"""The README's benchmark table is what benchmarks/latest.json gives, never typed by hand."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import table  # noqa: E402


def test_the_readme_table_is_rendered_from_latest_json():
    latest = json.loads((ROOT / "benchmarks" / "latest.json").read_text())
    assert table.readme_table((ROOT / "README.md").read_text()) == table.render(latest)
    assert latest["results"] and all("command" in r for r in latest["results"].values() if "error" not in r)
