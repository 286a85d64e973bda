"""TVM backend: lowering, scheduling and running tiny zoo models against torch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from tfcompile.backends.tvm import compile_graph, host_target, measure_graph  # noqa: E402
from tfcompile.backends.tvm.target import choose_cpu, cpu_flags  # noqa: E402
from tfcompile.errors import BackendError  # noqa: E402
from tfcompile.frontend import LoadOptions, load_model  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402
from tfcompile.passes import apply_pass  # noqa: E402

TINY = {
    "gpt2-small": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000),
    "bert-base": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      vocab_size=1000),
    # 32px / 8px patches: 17 tokens, an M that no register tile divides.
    "vit-base": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     image_size=32, patch_size=8),
    "llama-tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=1000),
    "minilm": None,  # real weights, full size (22M parameters)
}


def _load(name: str, seq: int = 16):
    return load_model(name, LoadOptions(batch=1, seq=seq, config_overrides=TINY[name]))


def _assert_close(outputs, reference, rtol=1e-4):
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        scale = ref.abs().max().clamp_min(1e-6)
        assert ((out - ref).abs().max() / scale).item() < rtol


@pytest.fixture(scope="module")
def bert():
    graph = _load("bert-base")
    return graph, compile_graph(graph, schedule="rules")


# minilm is full size (22M parameters): the slow run lowers it; the tiny models cover the same rules.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "minilm" else n for n in TINY])
def test_scheduled_model_matches_torch(name, request):
    if name == "bert-base":
        graph, module = request.getfixturevalue("bert")
    else:
        graph = _load(name)
        if name == "gpt2-small":
            # Also covers the padded LM head: vocab 1000 is no multiple of the vector width.
            graph, outcome = apply_pass(graph, "fold_constants")
            assert outcome.applied
        module = compile_graph(graph, schedule="rules")
    _assert_close(module.run(graph.example_inputs), graph.run())
    # Every kernel class these models produce has a rule.
    assert module.untuned_kernels == []
    assert {"matmul", "row-reduction", "injective"} <= set(module.kernel_rules.values())


def test_unscheduled_lowering_matches_torch_and_lists_every_kernel_as_untuned():
    graph = _load("bert-base")
    module = compile_graph(graph, schedule="none")
    _assert_close(module.run(graph.example_inputs), graph.run())
    assert module.kernel_rules == {}
    assert any(k.startswith("fused_matmul") for k in module.untuned_kernels)


def test_causal_mask_on_bool_tensors_lowers_without_fold_constants():
    # HF's mask construction cumsums and compares bool tensors, which TVM 0.27 lowers to
    # integer adds / float compares on i1; the backend canonicalises them itself.
    graph = _load("gpt2-small")
    module = compile_graph(graph, schedule="rules")
    _assert_close(module.run(graph.example_inputs), graph.run())


def test_batched_gpt2_lowers_although_its_traced_views_assume_another_attention_layout():
    # The CPU flash-attention decomposition returns [S, B, H, d]-ordered output, after which
    # GPT-2's x.view(-1, d) is illegal for B > 1 unless views are lowered as reshapes.
    graph = load_model("gpt2-small", LoadOptions(batch=2, seq=16, config_overrides=TINY["gpt2-small"]))
    module = compile_graph(graph, schedule="rules")
    _assert_close(module.run(graph.example_inputs), graph.run())


def test_run_on_new_inputs_matches_torch(bert):
    graph, module = bert
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1000, graph.example_inputs[0].shape, generator=generator)
    mask = torch.ones_like(graph.example_inputs[1])
    mask[:, -5:] = 0
    _assert_close(module.run((ids, mask)), graph.run((ids, mask)))


def test_host_target_names_a_cpu_never_native():
    target = host_target()
    assert target.kind.name == "llvm"
    mcpu = str(target.attrs["mcpu"])
    assert mcpu and mcpu not in ("native", "generic")
    assert "native" not in str(target)
    if "avx512f" in cpu_flags():
        from tvm.target import codegen

        assert codegen.llvm_get_vector_width(target) == 512


def test_cpu_choice_falls_back_to_the_flags_when_llvm_names_an_inconsistent_cpu():
    features = {"znver4": {"avx512f", "avx2", "fma"}, "x86-64-v4": {"avx512f", "avx2", "fma"},
                "x86-64-v3": {"avx2", "fma"}}
    known = set(features) | {"x86-64"}

    def valid(cpu):
        return cpu in known

    def has(cpu, feature):
        return feature in features.get(cpu, set())

    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2", "movbe"}
    v3 = {"avx2", "fma", "bmi2", "movbe"}
    assert choose_cpu("znver4", v4, valid=valid, has_feature=has) == "znver4"
    # A VM that masks AVX-512 must not get AVX-512 code.
    assert choose_cpu("znver4", v3, valid=valid, has_feature=has) == "x86-64-v3"
    assert choose_cpu("native", v4, valid=valid, has_feature=has) == "x86-64-v4"
    assert choose_cpu("futurecpu", v3, valid=valid, has_feature=has) == "x86-64-v3"


class _LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 256)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x))


def test_measure_graph_returns_a_positive_median():
    graph = export_module(_LinearGelu(), (torch.randn(1, 32, 64),), name="linear-gelu")
    measurement = measure_graph(graph, repeat=3)
    assert measurement.backend == "tvm"
    assert measurement.median_s > 0
    assert len(measurement.samples_s) == 3


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.special.i0(x) + 1


def test_tuned_schedule_without_records_falls_back_to_the_rules(tmp_path):
    graph = export_module(_LinearGelu(), (torch.randn(1, 32, 64),), name="linear-gelu")
    module = compile_graph(graph, schedule="tuned", database_dir=tmp_path)
    _assert_close(module.run(graph.example_inputs), graph.run())
    assert "tuned" not in module.kernel_rules.values()
    assert "matmul" in module.kernel_rules.values()


def test_unlowerable_graph_raises_a_one_line_backend_error():
    graph = export_module(_Unsupported(), (torch.randn(2, 8),), name="i0-model")
    with pytest.raises(BackendError) as info:
        compile_graph(graph)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("tvm: i0-model:")


def test_unknown_schedule_is_a_backend_error():
    graph = export_module(torch.nn.Linear(4, 4), (torch.randn(2, 4),), name="linear")
    with pytest.raises(BackendError, match="unknown schedule"):
        compile_graph(graph, schedule="fast")


# TVM's C++ warnings go to fd 2, past Python's warnings and logging: tfcompile filters them (native_log).
_NOISE = ("Scope Saving", "Fast mode segfaults")


def test_native_noise_is_dropped_and_every_other_line_kept(capfd, monkeypatch):
    import os

    from tfcompile.backends.tvm.native_log import filtered_stderr

    monkeypatch.delenv("TFCOMPILE_VERBOSE", raising=False)
    lines = (b"[08:01:02] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:\n"
             b"[08:01:02] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there are "
             b"out-of-bounds indices. Make sure input indices are in bound\n"
             b"[08:01:03] /project/src/x.cc:1: Warning: something else\n")
    with pytest.raises(RuntimeError, match="inside"):
        with filtered_stderr():
            os.write(2, lines)
            raise RuntimeError("inside")
    err = capfd.readouterr().err
    assert err == "[08:01:03] /project/src/x.cc:1: Warning: something else\n"
    monkeypatch.setenv("TFCOMPILE_VERBOSE", "1")
    with filtered_stderr():
        os.write(2, lines)
    assert capfd.readouterr().err == lines.decode()


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_compile_and_export_print_no_tvm_noise(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("TFCOMPILE_VERBOSE", raising=False)
    graph = export_module(_Embed().eval(), (torch.randint(0, 32, (1, 8)),), name="embed")
    capfd.readouterr()
    module = compile_graph(graph, schedule="rules")  # legalising the lookup logs "Fast mode"
    module.executable.export_library(str(tmp_path / "m.so"))  # one "Scope Saving" per memory scope
    quiet = capfd.readouterr()
    assert not [word for word in _NOISE if word in quiet.err + quiet.out]
    monkeypatch.setenv("TFCOMPILE_VERBOSE", "1")  # what `tfcompile --verbose` sets
    module.executable.export_library(str(tmp_path / "m2.so"))
    assert "Scope Saving" in capfd.readouterr().err  # the filter is what hid it
    _assert_close(module.run(graph.example_inputs), graph.run())


@pytest.mark.slow  # ~35 s on 2 cores: a tiny BERT traced, lowered, compiled, checked and exported
def test_export_command_prints_no_tvm_noise(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TFCOMPILE_VERBOSE"}
    result = subprocess.run([sys.executable, "-m", "tfcompile.cli", "export", "tests.tiny:bert", "--backend", "tvm",
                             "-o", str(tmp_path / "m.so")], cwd=repo, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.so").stat().st_size > 0
    assert result.stderr == ""
    assert not [word for word in _NOISE if word in result.stdout]
