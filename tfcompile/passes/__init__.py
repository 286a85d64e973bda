"""Rewrite passes. Importing this package registers every pass family.

Every module and sub-package here is a pass family (or the contract itself:
``base``, ``context``; or ``catalog``, the registry's metadata as a data file)
and is imported below, so adding a pass is writing one module: no list to
extend. `tfcompile passes` lists the catalog, which is generated: regenerate it
with ``python -m tfcompile.passes.catalog --write`` (a test fails until then).
"""

import importlib
import pkgutil

from tfcompile.passes.base import (  # noqa: F401
    Exactness,
    Pass,
    PassOutcome,
    PassRefused,
    PassResult,
    Stage,
    all_passes,
    apply_pass,
    check_pipeline,
    get_pass,
    pass_order,
    register_pass,
)
from tfcompile.passes.context import PassContext, Workload, default_context  # noqa: F401

for _family in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_family.name}")
