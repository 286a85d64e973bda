"""The README's command reference is the CLI's own help: regenerate it when a command changes."""

import pathlib

import pytest

from tfcompile.cli_reference import END, START, reference, with_reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_is_up_to_date():
    readme = README.read_text()
    assert with_reference(readme) == readme, (
        "README.md's command reference is stale: run `python -m tfcompile.cli_reference --write README.md`")


def test_reference_covers_every_command_and_option():
    from tfcompile.cli import cli

    text = reference()
    for name, command in cli.commands.items():
        assert f"#### `tfcompile {name}`" in text
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("-"):
                    assert flag in text, f"{name} {flag}"
    assert max(len(line) for line in text.splitlines()) <= 80


def test_markers_are_required():
    with pytest.raises(ValueError):
        with_reference("no markers here")
    with pytest.raises(ValueError):
        with_reference(f"{END}\n{START}")
