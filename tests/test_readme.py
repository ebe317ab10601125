"""The README documents the config keys and the test command that CI runs."""
import os
import re

from packaging.requirements import Requirement

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


def test_ci_runs_the_readme_test_command_at_both_ends():
    ci = read(".ci/run")
    command = "python -m pytest -q tests"
    assert f"pip install -r requirements-dev.txt -c constraints.txt && {command}" in read("README.md")
    assert f'PATH="$venv/bin:$PATH" {command}\n' in ci
    # Each virtualenv installs the requirements under its pins, the newest those of the README's command.
    assert '-m pip install --quiet -r requirements-dev.txt -c "$pins"' in ci
    lines = ci.splitlines()
    for line in ("newest=$(venv_for python3 constraints.txt)", 'oldest=$(venv_for "$python310" constraints-oldest.txt)',
                 'run_suite newest "$newest"', 'run_suite oldest "$oldest"'):
        assert line in lines


def pins(path: str) -> dict:
    """{name: requirement} of a requirements or constraints file, without comments and options (-r FILE)."""
    return {Requirement(line).name.lower(): Requirement(line) for line in read(path).splitlines()
            if line.strip() and not line.startswith(("#", "-"))}


def test_both_pinned_ends_lie_in_the_stated_range_and_the_readme_names_them():
    stated = {**pins("requirements.txt"), **pins("requirements-dev.txt")}
    readme = " ".join(read("README.md").split())
    for path in ("constraints.txt", "constraints-oldest.txt"):
        pinned = {name: str(requirement.specifier).removeprefix("==") for name, requirement in pins(path).items()}
        for name, requirement in stated.items():
            assert pinned[name] in requirement.specifier, f"{path}: {name} {pinned[name]} outside {requirement}"
        assert f"torch {pinned['torch']} with torchvision {pinned['torchvision']}" in readme, path
