"""README's key tables are generated from the dataclasses and must be current (`make docs`)."""
from pathlib import Path

from twin.docs import render


def test_readme_key_tables_are_current():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "`model.size`" in readme and "`inflation`" in readme
    assert render(readme) == readme, "README key tables are stale: run `make docs`"
