import onnx
import pytest
import torch

from tfcompile.backends import ort
from tfcompile.errors import BackendError
from tfcompile.graph import export_module
from tfcompile.variants import CLEANUP, VariantSpec, build_variant
from tfcompile.verify import compare_outputs
from tests.tiny import ARCHITECTURES, load_tiny


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exported_onnx_matches_torch(tmp_path, name):
    graph = load_tiny(name, batch=1, seq=16)
    variant = build_variant(graph, VariantSpec("cleanup", CLEANUP)).graph
    path = ort.export_onnx(variant, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path))
    check = compare_outputs(graph.run(), ort.OrtModel(path).run(graph.example_inputs))
    assert check.max_rel_err <= 1e-4


def test_measurement_is_a_positive_median(tmp_path):
    graph = load_tiny("bert-base", batch=1, seq=16)
    path = ort.export_onnx(graph, tmp_path / "model.onnx")
    result = ort.measure_file(path, graph.example_inputs, repeat=5)
    assert len(result.samples_s) == 5
    assert min(result.samples_s) <= result.median_s <= max(result.samples_s)
    assert result.median_s > 0


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    graph = load_tiny("bert-base", batch=1, seq=16)

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(ort.torch.onnx, "export", broken)
    target = tmp_path / "model.onnx"
    with pytest.raises(BackendError, match="exporter exploded"):
        ort.export_onnx(graph, target)
    assert list(tmp_path.iterdir()) == []


def test_reexports_an_onnx_file_written_by_torch(tmp_path):
    """Weights imported from a torch-written .onnx keep names like val_55, which the
    exporter also gives its own values; the re-export must not define them twice."""
    import torch

    from tests.tiny import bert
    from tfcompile.frontend import LoadOptions, load_model

    module, args = bert()
    source = tmp_path / "torch_written.onnx"
    with ort._quiet():  # the exporter prints progress; keep the test log readable
        torch.onnx.export(module, args, str(source), dynamo=True, input_names=["input_ids", "attention_mask"])
    graph = load_model(str(source), LoadOptions(seq=16))
    assert any(n.target.startswith("val_") for n in graph.nodes("get_attr"))  # the clash this test is about
    variant = build_variant(graph, VariantSpec("cleanup", CLEANUP)).graph
    path = ort.export_onnx(variant, tmp_path / "model.onnx")
    check = compare_outputs(graph.run(), ort.OrtModel(path).run(graph.example_inputs))
    assert check.max_rel_err <= 1e-4


def test_external_data_export_runs_and_converts_to_one_file(tmp_path):
    graph = load_tiny("gpt2-small", batch=1, seq=16)
    path = ort.export_onnx(graph, tmp_path / "work" / "m.onnx", external_data=True)
    # The graph and its weights file, and no temporary directory left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < (tmp_path / "work" / "m.onnx.data").stat().st_size
    expected = graph.run()
    assert compare_outputs(expected, ort.OrtModel(path).run(graph.example_inputs)).max_rel_err <= 1e-4
    single = ort.single_file(path, tmp_path / "out" / "model.onnx")
    assert [p.name for p in single.parent.iterdir()] == ["model.onnx"]
    assert compare_outputs(expected, ort.OrtModel(single).run(graph.example_inputs)).max_rel_err <= 1e-4


def test_failed_external_data_export_leaves_no_file(tmp_path, monkeypatch):
    graph = load_tiny("bert-base", batch=1, seq=16)

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(ort.torch.onnx, "export", broken)
    with pytest.raises(BackendError, match="exporter exploded"):
        ort.export_onnx(graph, tmp_path / "new" / "dirs" / "model.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []  # the directories made for it are gone too


def test_an_index_out_of_range_stops_the_onnx_model_with_one_line(tmp_path):
    """The same hostile indices as ``test_tvm_index_guard``: ONNX Runtime checks them itself."""

    class _Lookups(torch.nn.Module):
        def forward(self, table, ids, slots, values):
            return table[ids], torch.zeros(4).index_put((slots,), values, accumulate=True)

    inputs = (torch.randn(6, 3), torch.tensor([0, 5]), torch.tensor([0, 3, 1]), torch.ones(3))
    graph = export_module(_Lookups(), inputs, name="lookups")
    model = ort.OrtModel(ort.export_onnx(graph, tmp_path / "lookups.onnx"))
    for out, ref in zip(model.run(inputs), _Lookups()(*inputs)):
        torch.testing.assert_close(out, ref)
    for bad in ((inputs[0], torch.tensor([0, 6]), *inputs[2:]), (*inputs[:2], torch.tensor([0, 4, 1]), inputs[3])):
        with pytest.raises(IndexError):
            _Lookups()(*bad)
        with pytest.raises(BackendError, match="ONNX Runtime: lookups: run failed"):
            model.run(bad)
