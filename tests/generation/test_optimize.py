"""``optimize --generate``: exact passes on both generation graphs keep Hugging Face's greedy tokens.

Tiny GPT-2 and Llama (tests.tiny's configs, seeded weights; GPT-2 with
``initializer_range=0.2`` so its tokens depend on the cache, see
test_greedy). Every variant the search builds is generated with in torch and
compared token for token with ``generate`` on the original weights; the
measured ones are also exported and generated with in ONNX Runtime. The CLI
runs on a tiny GPT-2 saved as a Hugging Face model directory, as a user's
own checkpoint would be.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny import TINY_OVERRIDES
from tfcompile.frontend import LoadOptions, zoo
from tfcompile.generation.optimize import GenerationSettings, optimize_generation
from tfcompile.generation.pipeline import optimize_generation_model
from tfcompile.report import schema
from tfcompile.search import GENERATION_GAPS
from tfcompile.workload import Generation

MODELS = {"gpt2-small": {"initializer_range": 0.2}, "llama-tiny": {}}
GENERATION = Generation(prompt_len=10, new_tokens=6)


def _model(name: str):
    return zoo.build(name, seed=0, config_overrides={**TINY_OVERRIDES[name], **MODELS[name]}).model


@pytest.fixture(scope="module", params=list(MODELS))
def optimized(request):
    settings = GenerationSettings("cpu", GENERATION, batch=2, measure=True, repeat=1)
    result = optimize_generation(_model(request.param), settings, name=request.param)
    yield request.param, result
    result.cleanup()


def test_every_exact_variant_generates_the_original_tokens(optimized):
    name, result = optimized
    with_passes = [r for r in result.reports if r.passes and r.exact]
    assert with_passes, f"{name}: no exact pass applied to the generation graphs"
    # Beyond clean-up: a projection merge or a norm rewrite changed the graphs.
    assert any(set(r.passes) & {"merge_qkv_projections", "layernorm_to_rmsnorm", "fold_norm_affine",
                                "rmsnorm_to_crmsnorm"} for r in with_passes), [r.passes for r in with_passes]
    for report in result.reports:
        assert report.exact
        assert report.generation["tokens_identical"], f"{name} {report.name}: tokens differ from generate"
        assert report.max_rel_err < 1e-4, (report.name, report.max_rel_err)
        assert report.eligible, (report.name, report.note)


def test_measured_variants_generate_the_same_tokens_in_onnx_runtime(optimized):
    _, result = optimized
    measured = [r for r in result.reports if r.generation.get("measured")]
    assert {r.name for r in measured} >= {"baseline"} and len(measured) == 2
    for report in measured:
        timing = report.generation["measured"]
        assert timing["tokens_identical"]
        assert timing["ttft_ms"]["median"] > 0 and timing["tpot_ms"]["runs"] == GENERATION.new_tokens - 1
        assert report.measured_ms == pytest.approx(
            timing["ttft_ms"]["median"] + (GENERATION.new_tokens - 1) * timing["tpot_ms"]["median"])
    # The host's speed was probed around the timed generations (host_speed), for the report to compare with
    # the speed calibration ran at.
    speed = result.prediction["host_speed"]
    for probe in (speed["before_measuring"], speed["after_measuring"]):
        assert probe["gemm_flops_per_s"] > 1e9 and probe["read_bytes_per_s"] > 0.5e9


def test_torch_measures_the_generation_graphs_themselves():
    settings = GenerationSettings("cpu", GENERATION, batch=1, backend="torch", measure=True, repeat=1)
    result = optimize_generation(_model("llama-tiny"), settings, name="llama-tiny")
    try:
        measured = [r for r in result.reports if r.generation.get("measured")]
        assert len(measured) == 2 and all(r.backend == "torch" for r in measured)
        assert all(r.generation["measured"]["tokens_identical"] for r in measured)
        assert not result.onnx_files  # torch timed the GraphModules; nothing was exported to measure
    finally:
        result.cleanup()


def test_ranked_by_predicted_generation_time(optimized):
    _, result = optimized
    for report in result.reports:
        predicted = report.generation["predicted"]["cpu"]
        assert report.predicted_ms["cpu"] == pytest.approx(GENERATION.time_s(predicted["ttft_ms"],
                                                                             predicted["tpot_ms"]))
    # Every shipped target's roofline prices the generation: TTFT and TPOT for each.
    assert set(result.reports[0].generation["predicted"]) >= {"cpu", "a100", "h100", "npu", "edge"}


def test_passes_that_cannot_serve_a_cached_decoder_say_why(optimized):
    _, result = optimized
    for name in ("prune_tokens", "merge_tokens", "remove_padding", "local_attention"):
        assert name not in result.refusals or result.refusals[name] in GENERATION_GAPS.values()


def test_pipeline_writes_both_graphs_and_a_valid_report(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    outcome = optimize_generation_model("llama-tiny", tmp_path / "out", prompt_len=8, new_tokens=4, batch=1,
                                        load=LoadOptions(config_overrides=TINY_OVERRIDES["llama-tiny"]))
    report = json.loads(outcome.report_path.read_text())
    jsonschema.validate(report, schema())
    assert report["export"]["tokens_identical"] is True
    assert report["settings"]["generation"]["max_len"] == 11
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decode.onnx", "prefill.onnx", "report.json"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tfcompile.cli", *args], capture_output=True, text=True,
                          timeout=600, env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow  # a CLI subprocess over a saved model; twin: test_pipeline_writes_both_graphs_and_a_valid_report
def test_cli_generates_from_a_model_directory(tmp_path):
    model_dir = tmp_path / "tiny-gpt2"
    _model("gpt2-small").save_pretrained(model_dir)
    result = _cli("optimize", str(model_dir), "--generate", "--prompt-len", "8", "--new-tokens", "4",
                  "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("base") and "same" in line for line in lines), result.stdout
    assert any("decode step memory-bound" in line for line in lines), result.stdout
    assert all(len(line) <= 80 for line in lines)
    assert (tmp_path / "out" / "decode.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    (("--prompt-len", "8"), "give --generate too"),
    (("--generate", "--lengths", "3"), "--lengths does not apply to --generate"),
    (("--generate", "--new-tokens", "1"), "--new-tokens"),
])
def test_cli_refuses_options_that_do_not_fit(tmp_path, args, message):
    result = _cli("optimize", "gpt2-small", *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_model_that_does_not_generate_is_refused(tmp_path):
    model_dir = tmp_path / "tiny-bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**TINY_OVERRIDES["bert-base"])).save_pretrained(model_dir)
    result = _cli("optimize", str(model_dir), "--generate", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "not a causal LM" in result.stderr, result.stderr
