"""Rewrite the configuration table of README.md from util/config.py's SCHEMA (run after adding a key)."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.config import markdown_table  # noqa: E402

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
updated = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{markdown_table()}\n{END}", text,
                 flags=re.S)
readme.write_text(updated)
print(f"updated {readme}")
