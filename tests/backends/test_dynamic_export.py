"""The deployable ONNX file takes any batch and sequence length and matches torch at each (issue 23).

Tiny GPT-2 and BERT are exported once each (module fixtures, about 10 s apiece)
with export's default passes, then run in ONNX Runtime at batch 1, 3, 16 and
sequence 1, 77, 128, 512 against a freshly built model of the same seed.
"""

import onnx
import pytest
import torch

from tfcompile.backends import ort
from tfcompile.backends.dynamic_export import REL_TOLERANCE, export_deployable_onnx, export_variant_onnx, \
    static_reason
from tfcompile.frontend import LoadOptions, load_model, zoo
from tfcompile.variants import VariantSpec, build_variant
from tfcompile.verify import compare_outputs
from tests.tiny import TINY_OVERRIDES

EXPORT_PASSES = ("remove_identity_ops", "fold_constants", "eliminate_dead_code")  # `tfcompile export`'s default
BATCHES, SEQS = (1, 3, 16), (1, 77, 128, 512)
# GPT-2's tiny config has 128 positions; 512 lets the grid reach sequence 512.
OVERRIDES = {"gpt2-small": {**TINY_OVERRIDES["gpt2-small"], "n_positions": 512},
             "bert-base": TINY_OVERRIDES["bert-base"]}


@pytest.fixture(scope="module", params=list(OVERRIDES))
def exported(request, tmp_path_factory):
    name = request.param
    graph = load_model(name, LoadOptions(batch=1, seq=16, config_overrides=OVERRIDES[name]))
    variant = build_variant(graph, VariantSpec("export", EXPORT_PASSES))
    path = tmp_path_factory.mktemp(name) / "model.onnx"
    return name, graph, variant, export_variant_onnx(variant, path, original=graph)


def test_passes_apply_and_the_file_is_symbolic(exported):
    name, graph, variant, deployed = exported
    assert variant.applied_passes[:2] == ["remove_identity_ops", "fold_constants"]
    assert deployed.dynamic, deployed.static_reason
    assert deployed.dims == ("batch 1..", "seq 1..512")
    inputs = onnx.load(str(deployed.path)).graph.input
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in inputs] == [["batch", "seq"]] * len(inputs)
    # Checked at the traced shape and at the smallest, an odd, a wide and a long one.
    assert [c.label() for c in deployed.checks] == ["1x16", "1x1", "3x77", "16x16", "2x512"]
    assert deployed.max_rel_err <= REL_TOLERANCE


def test_runs_at_every_batch_and_sequence_and_matches_torch(exported):
    name, graph, _, deployed = exported
    reference_model = zoo.build(name, seed=0, config_overrides=OVERRIDES[name])  # same seed, built anew
    session = ort.OrtModel(deployed.path, threads=1)
    generator = torch.Generator().manual_seed(1)
    errors = {}
    for batch in BATCHES:
        for seq in SEQS:
            ids = torch.randint(0, 512, (batch, seq), generator=generator)
            mask = torch.ones_like(ids)
            if seq > 1:
                mask[0, seq // 2:] = 0  # one right-padded row: masking must follow the symbolic length
            inputs = (ids,) if len(graph.input_names) == 1 else (ids, mask)
            with torch.no_grad():
                reference = reference_model(*inputs)
            outputs = session.run(inputs)
            width = 512 if name == "gpt2-small" else 64
            assert outputs[0].shape == (batch, seq, width)
            errors[batch, seq] = compare_outputs(reference, outputs).max_rel_err
    assert max(errors.values()) <= REL_TOLERANCE, errors
    assert min(errors.values()) > 0  # real float outputs compared, not one array with itself


def test_an_onnx_input_stays_static_and_says_why(exported, tmp_path):
    name, _, _, deployed = exported
    if name != "bert-base":
        pytest.skip("one architecture is enough for the static path")
    graph = load_model(str(deployed.path), LoadOptions(batch=2, seq=8))
    static = export_deployable_onnx(graph, tmp_path / "static.onnx")
    assert not static.dynamic and "ONNX input" in static.static_reason
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(static.path)).graph.input]
    assert dims == [[2, 8], [2, 8]]
    assert [c.label() for c in static.checks] == ["2x8"] and static.max_rel_err <= REL_TOLERANCE


def test_shape_specialised_and_approximate_passes_keep_the_export_static(exported):
    _, graph, _, _ = exported
    assert static_reason(graph, list(EXPORT_PASSES)) is None
    assert "remove_padding is specialised to the traced batch" in static_reason(graph, ["remove_padding"])
    assert "approximate pass prune_tokens" in static_reason(graph, ["prune_tokens"])


def test_export_command_prints_the_symbolic_dims_and_every_checked_shape(tmp_path):
    from tests.test_cli import tfcompile

    path = tmp_path / "m.onnx"
    result = tfcompile("export", "-m", "tests.tiny:gpt2", "-o", str(path), "--opset", "18", "--atol", "1e-3")
    assert result.returncode == 0, result.stderr
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} == {18}
    lines = result.stdout.splitlines()
    assert lines[0] == "input shapes: symbolic batch 1.., seq 1..128"
    assert lines[1].startswith("ONNX Runtime vs torch at 1x16, 1x1, 3x77, 16x16, 2x128: max relative error ")
    assert float(lines[1].rsplit(" ", 1)[1]) <= REL_TOLERANCE
