import pathlib

import pytest

from tfcompile.errors import UnknownPassError
from tfcompile.passes import Exactness, all_passes, get_pass, register_pass

TESTS = pathlib.Path(__file__).parent


def test_every_pass_declares_exactness_and_is_tested():
    sources = "".join(p.read_text() for p in TESTS.glob("test_*.py"))
    for p in all_passes():
        assert isinstance(p.exactness, Exactness)
        assert p.description
        assert f'"{p.name}"' in sources, f"pass {p.name} has no test"


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("fold_constants", Exactness.EXACT, "dup", lambda g: None)(lambda g: None)


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(UnknownPassError, match="fold_constants"):
        get_pass("no_such_pass")
