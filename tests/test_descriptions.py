"""The package's own descriptions name what exists: every command of pyproject.toml's [project.scripts]."""

import tomllib
from pathlib import Path

import agmm_deploy.cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_package_names_every_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for command, target in scripts.items():
        assert command in agmm_deploy.cli.__doc__, command
        assert target.startswith("agmm_deploy.cli.") and f"({target.split('.')[2].split(':')[0]}.py)" in \
            agmm_deploy.cli.__doc__, target
