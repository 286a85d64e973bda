"""Workloads from the command line: sizes, length files, seeded batches (``tfcompile.workload``)."""

import pytest

from tfcompile.errors import InvalidOptionError
from tfcompile.workload import (MAX_SCENARIOS, Scenario, Workload, from_distribution, grid, parse_sizes,
                                read_lengths_file)


@pytest.mark.parametrize("text,sizes", [
    ("8", [8]),
    ("1,8", [1, 8]),
    ("8, 1, 8", [1, 8]),
    ("16..512", [16, 32, 64, 128, 256, 512]),
    ("3..20", [3, 4, 8, 16, 20]),
    ("100..100", [100]),
    ("1,16..64", [1, 16, 32, 64]),
])
def test_sizes_are_lists_ranges_or_both(text, sizes):
    assert parse_sizes(text, "--seq") == sizes


@pytest.mark.parametrize("text,match", [
    ("", "whole numbers"), ("0", "from 1 to"), ("-4", "from 1 to"), ("8..2", "low to high"), ("1.5", "whole"),
    ("2**40", "whole"), (str(2**40), "from 1 to"), ("1..", "whole"), ("a,b", "whole"),
])
def test_bad_sizes_name_the_option(text, match):
    with pytest.raises(InvalidOptionError, match=match) as caught:
        parse_sizes(text, "--batch")
    assert str(caught.value).startswith("--batch")


def test_a_length_file_is_lengths_or_a_histogram(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("# from the logs\n12\n12\n300  # a long one\n\n40 7\n40,3\n")
    assert read_lengths_file(path) == {12: 2, 300: 1, 40: 10}


@pytest.mark.parametrize("text,match", [
    ("12\nabc\n", "line 2"), ("12 3 4\n", "line 1"), ("0\n", "line 1"), ("12 -1\n", "line 1"), ("", "no lengths"),
    ("# only a comment\n", "no lengths"),
])
def test_bad_length_files_name_the_line(tmp_path, text, match):
    path = tmp_path / "lengths.txt"
    path.write_text(text)
    with pytest.raises(InvalidOptionError, match=match):
        read_lengths_file(path)


def test_length_files_that_are_not_text_or_too_large(tmp_path):
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InvalidOptionError, match="not a text file"):
        read_lengths_file(binary)
    huge = tmp_path / "huge"
    with huge.open("wb") as f:
        f.truncate(64 << 20)  # sparse: nothing is allocated unless it is read
    with pytest.raises(InvalidOptionError, match="bytes; a length file is at most"):
        read_lengths_file(huge)
    with pytest.raises(InvalidOptionError, match="not a file"):
        read_lengths_file(tmp_path)


def test_batches_drawn_from_a_distribution_are_seeded_and_padded_to_seq():
    counts = {8: 90, 400: 10}
    workload = from_distribution(counts, [4, 8], 512, seed=3)
    assert workload == from_distribution(counts, [4, 8], 512, seed=3)
    assert workload != from_distribution(counts, [4, 8], 512, seed=4)
    assert [s.batch for s in workload.scenarios] == [4] * 4 + [8] * 4
    assert all(s.seq == 512 and len(s.lengths) == s.batch and set(s.lengths) <= {8, 400}
               for s in workload.scenarios)
    assert workload.lengths == workload.scenarios[0].lengths  # the traced batch is the first draw
    with pytest.raises(InvalidOptionError, match="400 is longer than --seq 256"):
        from_distribution(counts, [4], 256)


def test_expected_value_weights_the_scenarios():
    workload = Workload(scenarios=(Scenario(1, 16, weight=3.0), Scenario(1, 64, weight=1.0)))
    assert workload.weights() == [0.75, 0.25]
    assert workload.expected([2.0, 10.0]) == pytest.approx(0.75 * 2.0 + 0.25 * 10.0)
    assert Scenario(2, 64, (10, 5)).valid_tokens == 15 and Scenario(2, 64).valid_tokens == 128


def test_a_grid_is_every_combination_and_bounded():
    assert [(s.batch, s.seq) for s in grid([1, 8], [16, 64]).scenarios] == [(1, 16), (1, 64), (8, 16), (8, 64)]
    with pytest.raises(InvalidOptionError, match=f"at most {MAX_SCENARIOS}"):
        grid(list(range(1, 6)), parse_sizes("1..1024", "--seq"))
