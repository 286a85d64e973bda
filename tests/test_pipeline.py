"""A library user gets what `tfcompile optimize` writes, from a few lines of Python."""

import json

import onnx

import tfcompile
from tfcompile.cli import main

# Timings differ between two runs; everything else in report.json must not.
TIMED = {"measured_ms", "measured_spread", "vs_baseline", "throughput_per_s"}


def _without_timings(report: dict) -> dict:
    report = dict(report)
    report["variants"] = [{k: v for k, v in variant.items() if k not in TIMED} for variant in report["variants"]]
    # The probes of the host's speed around the measurement are timings too, and so is the caption's clause on them.
    speed = report["prediction"].pop("host_speed")
    assert set(speed) >= {"before_measuring", "after_measuring"}
    report["prediction"]["text"] = report["prediction"]["text"].split("; host speed while measuring")[0]
    return report


def test_optimize_model_reproduces_the_cli(tmp_path):
    # Only the baseline is measured, so two runs cannot rank differently by timing noise alone.
    cli_dir, library_dir = tmp_path / "cli", tmp_path / "library"
    assert main(["optimize", "tests.tiny:bert", "--target", "cpu", "--measure", "--measure-top", "0",
                 "--repeat", "2", "-o", str(cli_dir)]) == 0

    outcome = tfcompile.optimize_model("tests.tiny:bert", library_dir, target="cpu", measure=True, measure_top=0,
                                       repeat=2)

    cli_report = json.loads((cli_dir / "report.json").read_text())
    library_report = json.loads(outcome.report_path.read_text())
    assert _without_timings(library_report) == _without_timings(cli_report)
    assert [v["measured_ms"] > 0 for v in library_report["variants"] if "measured_ms" in v] == [True]  # the baseline
    # A measured run plots predicted against measured latency next to the report.
    assert (library_dir / "predicted_vs_measured.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli_model, library_model = onnx.load(cli_dir / "model.onnx"), onnx.load(outcome.onnx_path)
    assert library_model.graph.SerializeToString() == cli_model.graph.SerializeToString()


def test_the_written_model_serves_shapes_it_was_not_traced_at(tmp_path):
    """Issue 23: a 7-token request to the model.onnx that optimize wrote at 16 tokens runs and matches torch."""
    from tests.tiny import TINY_OVERRIDES
    from tfcompile.backends.ort import OrtModel
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.verify import compare_outputs

    load = LoadOptions(batch=2, seq=16, config_overrides=TINY_OVERRIDES["bert-base"])
    outcome = tfcompile.optimize_model("bert-base", tmp_path / "out", passes=("fold_constants",), load=load)
    export = json.loads(outcome.report_path.read_text())["export"]
    assert export["static_reason"] is None and any(d.startswith("seq") for d in export["dynamic_dims"])
    assert len(export["checked_at"]) >= 3
    other = load_model("bert-base", LoadOptions(batch=3, seq=7, config_overrides=TINY_OVERRIDES["bert-base"]))
    outputs = OrtModel(outcome.onnx_path).run(other.example_inputs)
    assert compare_outputs(other.run(), outputs, other.output_names).max_rel_err <= 1e-4


def test_a_variant_that_cannot_be_exported_gives_way_to_the_next_best(tmp_path, monkeypatch):
    """Issue 23: the best variant's export fails (as Mixtral's did in torch's exporter): it is reported as not
    lowered and the next best eligible variant is exported and named best."""
    from tests.tiny import TINY_OVERRIDES
    from tfcompile.backends import dynamic_export
    from tfcompile.errors import BackendError
    from tfcompile.frontend import LoadOptions

    real_export = dynamic_export.export_variant_onnx
    refused = []

    def export_all_but_the_first(variant, *args, **kwargs):
        if not refused:
            refused.append(variant.name)
            raise BackendError(f"ONNX export of {variant.name} failed: no translation for aten::fake_op")
        return real_export(variant, *args, **kwargs)

    monkeypatch.setattr(dynamic_export, "export_variant_onnx", export_all_but_the_first)
    load = LoadOptions(batch=2, seq=16, config_overrides=TINY_OVERRIDES["bert-base"])
    outcome = tfcompile.optimize_model("bert-base", tmp_path / "out", load=load)
    report = json.loads(outcome.report_path.read_text())
    failed = next(v for v in report["variants"] if v["name"] == refused[0])
    assert failed["eligible"] is False and failed["rejected"] == "not lowered"
    assert "fake_op" in failed["note"]
    assert report["best"] != refused[0] and next(v for v in report["variants"] if v["name"] == report["best"])[
        "eligible"]
    assert outcome.onnx_path.is_file()
