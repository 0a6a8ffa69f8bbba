"""README.md documents every command of the CLI: ``python cli.py <command>`` (``python cli.py weights <sub>``)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

import cli

ROOT = Path(__file__).resolve().parent.parent


def commands(group, prefix: tuple = ()) -> list[str]:
    """Every leaf command of the app, as "weights download", "ingest", ... (hidden ones left out).

    ``group`` is the click group typer builds (typer may vendor click: its classes are not ``click.Group``, so
    groups are recognised by their ``commands`` mapping)."""
    found = []
    for name, cmd in group.commands.items():
        if getattr(cmd, "hidden", False):
            continue
        path = prefix + (name,)
        if isinstance(getattr(cmd, "commands", None), dict):
            found.extend(commands(cmd, path))
        else:
            found.append(" ".join(path))
    return found


def test_the_app_has_the_commands_we_expect():
    found = set(commands(typer.main.get_command(cli.app)))
    # the core commands must exist; others (added later) are checked against the README below
    assert {"ingest", "query", "stats", "embed", "verify", "vec-path",
            "weights download", "weights convert", "weights info", "weights path"} <= found, found


def test_every_command_is_in_the_readme():
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text(encoding="utf-8")
    missing = []
    for command in commands(typer.main.get_command(cli.app)):
        words = r"\s+".join(re.escape(w) for w in command.split())
        # "python cli.py stats" but not "python cli.py stats-foo"; any run of spaces; the command may be followed
        # by options, a newline or the end of a code span
        if not re.search(rf"python3?\s+cli\.py\s+{words}(?![\w-])", text):
            missing.append(f"python cli.py {command}")
    assert not missing, "README.md does not show: " + ", ".join(missing)
