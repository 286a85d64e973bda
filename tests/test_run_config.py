"""--run-config: a whole run's options from a TOML file; the command line wins; a bad file is one clear error."""

import pytest

from tfcompile.cli import main


def run(capsys, *args):
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_options_come_from_the_file_and_the_command_line_wins(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[targets]\nshow = "edge"\n')
    status, out, err = run(capsys, "--run-config", str(config), "targets")
    assert status == 0 and err == ""
    assert 'name = "edge"' in out
    status, out, _ = run(capsys, "--run-config", str(config), "targets", "--show", "a100")
    assert status == 0 and 'name = "a100"' in out and 'name = "edge"' not in out


def test_lists_read_as_comma_separated_values(tmp_path):
    import click

    from tfcompile.cli import cli
    from tfcompile.cli_options import run_config_defaults

    config = tmp_path / "run.toml"
    config.write_text('[optimize]\nmodel = "minilm"\nbatch = [1, 8]\nallow-approx = true\nlengths_file = "l.txt"\n')
    defaults = run_config_defaults(config, cli.commands)
    assert defaults == {"optimize": {"model": "minilm", "batch": "1,8", "allow_approx": True,
                                     "lengths_file": "l.txt"}}
    assert isinstance(cli.commands["optimize"], click.Command)


@pytest.mark.parametrize("content, message", [
    (b"[nope]\nx = 1\n", "[nope] is not a command's table"),
    (b"[optimize]\nbogus = 1\n", "has no option 'bogus'"),
    (b"[optimize]\ntarget = { a = 1 }\n", "a string, number, true/false"),
    (b"[optimize]\nbatch = [true]\n", "a string, number, true/false"),
    (b"x = [\n", "not TOML"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
    (b"optimize = 3\n", "is not a command's table"),
])
def test_a_bad_run_file_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.toml"
    config.write_bytes(content)
    status, out, err = run(capsys, "--run-config", str(config), "targets")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_a_huge_or_missing_run_file_is_refused_before_reading(tmp_path, capsys):
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as f:
        f.truncate(64 << 20)  # sparse: nothing is allocated, and nothing must be read
    status, _, err = run(capsys, "--run-config", str(huge), "targets")
    assert status == 2 and "too large for a run file" in err
    for path in (tmp_path / "missing.toml", tmp_path):
        status, _, err = run(capsys, "--run-config", str(path), "targets")
        assert status == 2 and "not a file" in err and len(err.strip().splitlines()) == 1
