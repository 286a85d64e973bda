import pytest


@pytest.fixture(autouse=True)
def isolated_profiles(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's calibration profiles or TVM tuning databases."""
    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(tmp_path_factory.mktemp("tvm-tuning")))
