import os
import stat

import pytest

from tfcompile.outputs import atomic_path, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_written_files_get_the_mode_of_any_new_file(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_run_keeps_its_temporary_files_in_one_folder_it_removes(tmp_path, monkeypatch):
    import os
    import tempfile

    import pytest

    from tfcompile.outputs import private_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(KeyboardInterrupt), private_tempdir() as folder:
        assert tempfile.gettempdir() == os.environ["TMPDIR"] == str(folder) and folder.parent == tmp_path
        (folder / ".ses").write_text("a library's session file")
        (folder / "torchinductor_root").mkdir()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert tempfile.gettempdir() == os.environ["TMPDIR"] == str(tmp_path)
