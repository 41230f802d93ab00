"""Regenerate README's case-key tables from the dataclasses: `python -m twin.docs README.md`."""
from __future__ import annotations

import re
import sys
from pathlib import Path

START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def render(readme: str) -> str:
    """README text with the block between the markers replaced by the current tables."""
    from twin.config import keys_table

    block = f"{START}\n{keys_table()}\n{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
