"""MetaSchedule tuning into a database, and its reuse (fast: one kernel, four trials)."""

import pytest

from tests.test_cli import tfcompile
from tfcompile.backends.tvm import compile_graph, host_target
from tfcompile.backends.tvm import tuning
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.verify import compare_outputs

MODEL = "tests.tiny:bert"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    graph = load_model(MODEL, LoadOptions())
    target = compile_graph(graph, schedule="rules").target
    kernels = tuning.kernels_of(graph, target)
    heaviest = max(kernels, key=lambda name: tuning._flops(kernels[name]))
    root = tmp_path_factory.mktemp("db")
    first = tuning.tune_graph(graph, target=target, root=root, max_trials=4, kernels=[heaviest])
    return graph, root, heaviest, first


def test_tuning_writes_records_for_the_kernel(tuned):
    graph, root, kernel, first = tuned
    assert first.tuned == {kernel: first.tuned[kernel]} and first.tuned[kernel] >= 1
    assert first.reused == [] and first.trial_budget == 4
    assert tuning.has_database(host_target(), root)
    # The rules' schedule is measured and recorded like a trial: the best record is never worse.
    outcome = first.outcomes[kernel]
    assert outcome["rules_s"] is not None and outcome["best_s"] <= outcome["rules_s"]


def test_second_tuning_reuses_the_database_without_tuning(tuned):
    graph, root, kernel, first = tuned
    second = tuning.tune_graph(graph, root=root, max_trials=4, kernels=[kernel])
    assert second.tuned == {} and second.reused == [kernel] and second.trial_budget == 0


def _claim_timings(root, graph, kernel, rules_s, best_s):
    """Overwrite the tuner's rules-vs-best timings for ``kernel`` (to test the MIN_GAIN policy both ways)."""
    import json

    path = tuning.database_dir(host_target(), root) / tuning.RULES_FILE
    timings = json.loads(path.read_text())
    key = tuning._workload_key(tuning.kernels_of(graph, host_target())[kernel])
    assert key in timings  # tune_graph recorded this kernel's timings
    timings[key] = {"rules_s": rules_s, "best_s": best_s}
    path.write_text(json.dumps(timings))


def test_compiling_uses_the_records_and_matches_torch(tuned):
    graph, root, kernel, _ = tuned
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    module = compile_graph(graph, database_dir=root)  # "auto": the database exists, so "tuned"
    assert module.schedule == "tuned"
    assert module.kernel_rules[kernel] == "tuned"
    assert module.untuned_kernels == []
    assert "1 kernels from tuning records" in module.schedule_summary()
    check = compare_outputs(graph.run(), module.run(graph.example_inputs), graph.output_names)
    assert check.max_rel_err <= 1e-4


def test_a_record_less_than_min_gain_faster_than_the_rules_is_not_used(tuned):
    graph, root, kernel, _ = tuned
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=(1 - tuning.MIN_GAIN / 2) * 1e-3)
    module = compile_graph(graph, database_dir=root)
    assert module.schedule == "tuned" and module.kernel_rules[kernel] == "matmul"
    check = compare_outputs(graph.run(), module.run(graph.example_inputs), graph.output_names)
    assert check.max_rel_err <= 1e-4


def test_without_a_database_compiling_uses_the_rules(tmp_path):
    graph = load_model(MODEL, LoadOptions())
    module = compile_graph(graph, database_dir=tmp_path / "empty")
    assert module.schedule == "rules" and "tuned" not in module.kernel_rules.values()


def test_tune_command_reports_reuse(tuned):
    graph, root, kernel, _ = tuned
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    result = tfcompile("tune", MODEL, "--passes", "", "--trials", "4", "--kernels", kernel, "--database", str(root))
    assert result.returncode == 0, result.stderr
    assert "reused" in result.stdout and "0 kernels tuned" in result.stdout
    assert "1 kernels from tuning records" in result.stdout
    assert "tuned TVM vs torch: max relative error" in result.stdout


def test_tune_command_refuses_other_targets():
    result = tfcompile("tune", MODEL, "--target", "h100")
    assert result.returncode == 2 and "only 'cpu'" in result.stderr


def test_export_tvm_library_uses_the_database(tuned, tmp_path, monkeypatch):
    import tvm
    from tvm import relax

    graph, root, kernel, _ = tuned
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    library = tmp_path / "model.so"
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(root))  # the default database, as a user's would be
    result = tfcompile("export", MODEL, "--passes", "", "--backend", "tvm", "-o", str(library))
    assert result.returncode == 0, result.stderr
    assert "1 kernels from tuning records" in result.stdout
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in graph.example_inputs])
    got = outputs.numpy() if hasattr(outputs, "numpy") else outputs[0].numpy()
    reference = graph.run()[0].numpy()
    assert abs(got - reference).max() <= 1e-4 * abs(reference).max()
