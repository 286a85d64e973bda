"""compare --explain-ops: the variants furthest off, split per group of ops, predicted against the runtime's
per-kernel profile (ORT's profiler, TVM's VM instrument)."""

import json

import pytest

from tests.test_cli import tfcompile
from tests.tiny import load_tiny
from tfcompile.compare import ComparisonRow
from tfcompile.cost_models import load_device
from tfcompile.cost_models.attribution import GROUPS
from tfcompile.cost_models.model import RooflineCostModel
from tfcompile.errors import InvalidOptionError
from tfcompile.explain import DEFAULT_COUNT, explain, explained_count, furthest_rows, groups_off_ms


def test_ort_and_tvm_explain_by_default_and_torch_only_when_not_asked():
    assert explained_count("ort", None) == explained_count("tvm", None) == DEFAULT_COUNT
    assert explained_count("ort", 0) == 0 and explained_count("tvm", 5) == 5
    assert explained_count("torch", None) == 0 and explained_count("torch", 0) == 0
    with pytest.raises(InvalidOptionError, match="per-kernel profile"):
        explained_count("torch", 2)


def test_the_rows_furthest_off_come_first():
    rows = [ComparisonRow(name, measured, {"roofline": predicted}) for name, measured, predicted in
            (("close", 10.0, 10.5), ("far", 10.0, 4.0), ("middle", 10.0, 13.0))]
    assert furthest_rows(rows, 2) == ("roofline", [rows[1], rows[2]])


def test_a_variant_is_split_on_both_sides_and_the_files_are_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    graph = load_tiny("bert-base", batch=1, seq=16)
    model = RooflineCostModel(load_device("cpu"), "ort")
    rows = [ComparisonRow(graph.name, 1.0, {"roofline": 3.0})]
    (explained,) = explain(rows, {graph.name: graph}, model, count=1)
    assert explained.variant == graph.name and explained.predictor == "roofline"
    assert list(explained.predicted_ms) == list(explained.measured_ms) == list(GROUPS)
    assert explained.measured_ms["weight matmuls"] > 0 and explained.measured_ms["attention"] > 0
    assert explained.measured_ms["norms"] > 0  # BERT's residual adds and LayerNorms: SkipLayerNormalization
    gap = explained.predicted_ms[explained.furthest_group] - explained.measured_ms[explained.furthest_group]
    assert explained.furthest_off_ms == pytest.approx(gap)
    assert list(groups_off_ms([explained]).values())[0] == pytest.approx(gap)
    # The export and the profiler's JSON, removed (ORT itself leaves a session id file, ".ses", in $TMPDIR).
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tfcompile-")] == []


@pytest.mark.slow  # a CLI subprocess measuring three variants; in process: ..._split_on_both_sides_...
def test_compare_names_the_groups_furthest_off(tmp_path):
    out = tmp_path / "cmp"
    result = tfcompile("compare", "tests.tiny:bert", "--seqs", "16", "--repeat", "2", "--explain-ops", "1",
                       "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "furthest off over these variants:" in result.stdout
    report = json.loads((out / "compare.json").read_text())
    (explained,) = report["explained"]
    assert explained["variant"] in {v["name"] for v in report["variants"]}
    assert set(explained["measured_ms"]) == set(GROUPS)


def test_tvm_splits_a_variant_by_its_fused_kernels():
    graph = load_tiny("bert-base", batch=1, seq=16)
    model = RooflineCostModel(load_device("cpu"), "tvm")
    rows = [ComparisonRow(graph.name, 1.0, {"roofline": 3.0})]
    (explained,) = explain(rows, {graph.name: graph}, model, count=1)
    assert explained.profiled_by == "TVM's VM instrument" and list(explained.measured_ms) == list(GROUPS)
    # Packed-weight matmuls, the attention's batched matmuls and softmax, BERT's LayerNorms, the VM's allocations.
    for group in ("weight matmuls", "attention", "norms", "between kernels"):
        assert explained.measured_ms[group] > 0, group
    assert sum(explained.measured_ms.values()) == pytest.approx(explained.profiled_run_ms, rel=0.05)


def test_compare_refuses_to_explain_where_there_is_no_profiler(tmp_path):
    result = tfcompile("compare", "tests.tiny:bert", "--backend", "torch", "--explain-ops", "2",
                       "-o", str(tmp_path / "cmp"))
    assert result.returncode == 2 and "--explain-ops" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cmp").exists()
