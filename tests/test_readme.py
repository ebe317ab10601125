"""The README documents the config keys and the test command that CI runs."""
import os
import re

from conftest import REPO
from util.config import markdown_table


def read(path):
    with open(os.path.join(REPO, path)) as handle:
        return handle.read()


def test_readme_config_table_matches_schema():
    readme = read("README.md")
    table = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", readme, re.S)
    assert table, "README.md lacks the config-table markers"
    assert table.group(1) == markdown_table(), "run: python scripts/update_readme_config.py"


def test_ci_runs_the_readme_test_command():
    command = read(".ci/run").strip().splitlines()[-1]
    assert command == "python -m pytest -q tests"
    assert f"pip install -r requirements-dev.txt && {command}" in read("README.md")
