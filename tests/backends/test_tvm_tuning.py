"""MetaSchedule tuning into a database, and its reuse (one kernel, four trials).

Tuning starts MetaSchedule's builder and runner workers and searches: minutes on
the 2-core VM even for one trial, so the tests that tune are slow (`make test-slow`).
Their fast twins below read a database holding a record written without tuning
(the rules' own schedule of the kernel), which takes every path but the search.
"""

import json

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


@pytest.mark.slow  # tunes (fixture `tuned`)
def test_tuning_writes_records_for_the_kernel(tuned):
    graph, root, kernel, first = tuned
    assert first.tuned == {kernel: first.tuned[kernel]} and first.tuned[kernel] >= 1
    assert first.reused == [] and first.trial_budget == 4
    assert tuning.has_database(host_target(), root)
    # The rules' schedule is measured and recorded like a trial: the best record is never worse.
    outcome = first.outcomes[kernel]
    assert outcome["rules_s"] is not None and outcome["best_s"] <= outcome["rules_s"]


@pytest.mark.slow  # tunes (fixture `tuned`)
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


def _assert_a_faster_record_is_used(graph, root, kernel):
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    module = compile_graph(graph, database_dir=root)  # "auto": the database exists, so "tuned"
    assert module.schedule == "tuned"
    assert module.kernel_rules[kernel] == "tuned"
    assert module.untuned_kernels == []
    assert "1 kernels from tuning records" in module.schedule_summary()
    check = compare_outputs(graph.run(), module.run(graph.example_inputs), graph.output_names)
    assert check.max_rel_err <= 1e-4


@pytest.mark.slow  # tunes (fixture `tuned`)
def test_compiling_uses_the_records_and_matches_torch(tuned):
    graph, root, kernel, _ = tuned
    _assert_a_faster_record_is_used(graph, root, kernel)


@pytest.mark.slow  # tunes (fixture `tuned`)
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


@pytest.mark.slow  # tunes (fixture `tuned`)
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


@pytest.mark.slow  # tunes (fixture `tuned`)
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


# -- fast twins: a database with one record written without tuning ---------------------------------

# One residual low-rank FFN block: four GEMMs and a GELU, compiled in seconds.
TWIN_MODEL = ["tests.tiny:lowrank_ffn", "--input-shape", "x=1x16x256:float32"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A database whose only record is the rules' schedule of the heaviest kernel, as tune_graph commits it
    before searching (``_record_rules_schedule``), with made-up timings instead of a build and a run."""
    from tvm.s_tir import meta_schedule as ms

    from tfcompile.backends.tvm import rules
    from tfcompile.backends.tvm.intrinsics import import_tensor_intrinsics

    import torch

    graph = load_model(TWIN_MODEL[0], LoadOptions(input_shapes={"x": (1, 16, 256)}, input_dtypes={"x": torch.float32}))
    target = host_target()
    kernels = tuning.kernels_of(graph, target)
    heaviest = max(kernels, key=lambda name: tuning._flops(kernels[name]))
    root = tmp_path_factory.mktemp("recorded-db")
    path = tuning.database_dir(target, root)
    tuning.require_json_serialization()
    import_tensor_intrinsics()
    database = tuning._open(path)
    workload = tuning._workload(kernels[heaviest])
    sch, _rule = rules.rule_schedule(workload["main"], target)
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, database.commit_workload(workload), [1e-3],
                                                           target, args_info))
    (path / tuning.RULES_FILE).write_text(json.dumps({tuning._workload_key(kernels[heaviest]): {
        "rules_s": 1e-3, "best_s": 1e-3}}))
    assert tuning.has_database(target, root)
    return graph, root, heaviest


def test_compiling_uses_a_record_only_when_it_beats_the_rules(recorded):
    """Fast twin of test_compiling_uses_the_records_and_matches_torch and of the MIN_GAIN test."""
    graph, root, kernel = recorded
    _assert_a_faster_record_is_used(graph, root, kernel)
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=(1 - tuning.MIN_GAIN / 2) * 1e-3)
    module = compile_graph(graph, database_dir=root)
    assert module.schedule == "tuned" and module.kernel_rules[kernel] == "matmul"


def test_tune_command_reports_reuse_in_process(recorded, capsys, monkeypatch):
    """Fast twin of test_tune_command_reports_reuse and test_second_tuning_reuses_...: the CLI in this process."""
    from tvm.s_tir import meta_schedule as ms

    from tfcompile.cli import main

    # Reusing builds and runs nothing. MetaSchedule's LocalBuilder and LocalRunner each start a worker
    # process to check itself when created (~13 s apiece here), which tune_graph does even when every
    # kernel is reused: stand-ins that cannot build or run keep this test fast and prove nothing ran.
    monkeypatch.setattr(ms.builder, "LocalBuilder", lambda **kwargs: None)
    monkeypatch.setattr(ms.runner, "LocalRunner", lambda **kwargs: None)
    graph, root, kernel = recorded
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    assert main(["tune", *TWIN_MODEL, "--passes", "", "--trials", "4", "--kernels", kernel,
                 "--database", str(root)]) == 0
    stdout = capsys.readouterr().out
    assert "reused" in stdout and "0 kernels tuned with a budget of 0 trials, 1 reused" in " ".join(stdout.split())
    assert "1 kernels from tuning records" in stdout
    assert "tuned TVM vs torch: max relative error" in stdout


def test_export_tvm_library_uses_the_records_in_process(recorded, tmp_path, monkeypatch, capsys):
    """Fast twin of test_export_tvm_library_uses_the_database: the CLI in this process."""
    import tvm
    from tvm import relax

    from tfcompile.cli import main

    graph, root, kernel = recorded
    _claim_timings(root, graph, kernel, rules_s=1e-3, best_s=0.5e-3)
    library = tmp_path / "model.so"
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(root))  # the default database, as a user's would be
    assert main(["export", *TWIN_MODEL, "--passes", "", "--backend", "tvm", "-o", str(library)]) == 0
    assert "1 kernels from tuning records" in capsys.readouterr().out
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in graph.example_inputs])
    got = outputs.numpy() if hasattr(outputs, "numpy") else outputs[0].numpy()
    reference = graph.run()[0].numpy()
    assert abs(got - reference).max() <= 1e-4 * abs(reference).max()
