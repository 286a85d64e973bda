"""Commands that answer at once: help, listings and an unknown --target never import torch.

Each command runs in a fresh interpreter (``tfcompile.cli.main``), which then
asserts that torch is not in ``sys.modules``: importing torch is what made
these take seconds. Deterministic, not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tfcompile.cli import main
from tfcompile.cost_models.device import available_targets, device_file

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "tfcompile" / "passes" / "catalog" / "passes.json"

RUN_WITHOUT_TORCH = """
import sys
from tfcompile.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
assert "torch" not in sys.modules, "this command imported torch"
sys.exit(code)
"""


def run_without_torch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # a wide table: one row per pass, names whole
    env.pop("TFCOMPILE_VERBOSE", None)
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_lists_the_commands_and_verbose():
    result = run_without_torch("--help")
    assert result.returncode == 0, result.stderr
    for word in ("optimize", "passes", "targets", "--verbose"):
        assert word in result.stdout


def test_passes_lists_every_pass_of_the_catalog():
    result = run_without_torch("passes")
    assert result.returncode == 0, result.stderr
    catalog = json.loads(CATALOG.read_text(encoding="utf-8"))
    assert len(catalog) >= 10
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in result.stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    assert rows == {p["name"]: p["exactness"] for p in catalog}


def test_targets_lists_every_device():
    result = run_without_torch("targets")
    assert result.returncode == 0, result.stderr
    for name in available_targets():
        assert f"│ {name} " in result.stdout


def test_targets_show_prints_the_device_file():
    result = run_without_torch("targets", "--show", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == device_file("cpu").read_text()
    tomllib.loads(result.stdout)


@pytest.mark.parametrize("args", [
    ("optimize", "minilm", "--target", "nope"),
    ("compare", "minilm", "--target", "nope"),
    ("calibrate", "--target", "nope"),
    ("tune", "minilm", "--target", "nope"),
], ids=lambda args: args[0])
def test_an_unknown_target_is_refused_before_torch_is_imported(args, tmp_path):
    result = run_without_torch(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown target 'nope'"), result.stderr
    assert "cpu" in lines[0]  # the known targets are named
    assert not list(tmp_path.iterdir())  # no default output directory made


def test_the_pass_catalog_is_the_registry():
    # If this fails after a pass was added or changed: python -m tfcompile.passes.catalog --write
    from tfcompile.passes.catalog import CATALOG_PATH, build_catalog, render

    assert CATALOG_PATH == CATALOG
    assert json.loads(CATALOG.read_text(encoding="utf-8")) == build_catalog()
    assert CATALOG.read_text(encoding="utf-8") == render(build_catalog())  # as --write writes it


def test_verbose_lasts_for_its_command_only(monkeypatch, capsys):
    monkeypatch.delenv("TFCOMPILE_VERBOSE", raising=False)
    assert main(["--verbose", "targets"]) == 0
    assert "TFCOMPILE_VERBOSE" not in os.environ
    monkeypatch.setenv("TFCOMPILE_VERBOSE", "0")
    assert main(["--verbose", "targets"]) == 0
    assert os.environ["TFCOMPILE_VERBOSE"] == "0"
    capsys.readouterr()
