"""The pass catalog: what `tfcompile passes` lists, as a data file shipped in the package.

The pass families import torch (seconds); listing them should not. So the
registry's metadata (name, exactness, stage, description) is also written to
``passes.json`` in this directory, and the CLI reads that file alone
(``importlib.resources``, without importing ``tfcompile.passes``).

The file is generated, never edited by hand. After adding a pass or changing
one's name, exactness, stage or description, regenerate it::

    python -m tfcompile.passes.catalog --write

``tests/test_fast_start.py`` rebuilds the catalog from the live registry and
fails when the file differs (``--check`` does the same from the shell).
"""

from __future__ import annotations

from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("passes.json")


def build_catalog() -> list[dict[str, str]]:
    """One entry per registered pass, in ``all_passes()`` order (by name)."""
    from tfcompile.passes import all_passes

    return [{"name": p.name, "exactness": p.exactness.value, "stage": p.stage.name.lower(),
             "description": p.description} for p in all_passes()]


def render(catalog: list[dict[str, str]]) -> str:
    import json

    return json.dumps(catalog, indent=2, ensure_ascii=False) + "\n"
