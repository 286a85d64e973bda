"""``python -m tfcompile.passes.catalog [--write | --check]``: print, rewrite or check ``passes.json``."""

from __future__ import annotations

import argparse
import sys

from tfcompile.passes.catalog import CATALOG_PATH, build_catalog, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfcompile.passes.catalog",
                                     description="The pass list `tfcompile passes` reads, from the live registry.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {CATALOG_PATH}")
    action.add_argument("--check", action="store_true", help=f"exit 1 if {CATALOG_PATH.name} is out of date")
    args = parser.parse_args(argv)
    text = render(build_catalog())
    if args.write:
        CATALOG_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {CATALOG_PATH}")
    elif args.check:
        current = CATALOG_PATH.read_text(encoding="utf-8") if CATALOG_PATH.exists() else ""
        if current != text:
            print(f"{CATALOG_PATH} is out of date: run `python -m tfcompile.passes.catalog --write`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
