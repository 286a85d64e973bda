"""MetaSchedule tuning records behind ``schedule="tuned"``.

``tune_graph`` searches schedules for a graph's fused kernels with TVM's
MetaSchedule and stores the best in a JSON database (MetaSchedule's own
format: a workload table keyed by the kernel's structural hash and a tuning
record table). Databases live in one directory per target
(``database_dir``), so records measured on one CPU are never applied on
another. ``ApplyTuned`` schedules each kernel from its record when the
database has one, and with tfcompile's rules otherwise; kernels with neither
are reported as untuned.

A record replaces the rules' schedule only if the tuner measured it at least
``MIN_GAIN`` faster than the rules' own schedule of the same kernel (both
medians are kept beside the database, in ``rules.json``): trials are timed in
isolation, from hot caches, a few runs each, and a record a hair faster there
was as often slower inside the model (GPT-2 small: 240 ms tuned against 231
ms with the rules in one run, with every record "no worse" than the rules).

The wheel has no xgboost, so the search uses MetaSchedule's random cost
model: evolutionary search guided by measurements only. Tuning runs builder
and runner worker processes and takes minutes per kernel; it is never
started implicitly by compiling. MetaSchedule's database needs TVM's JSON
serialisation, which crashes with the apache-tvm-ffi that pip resolves today
(see ``require_json_serialization``): both tuning and reading records check
it first and fail with a BackendError instead of a segfault.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import tvm
from tvm import tirx

from tfcompile.backends.tvm import rules
from tfcompile.backends.tvm.intrinsics import import_tensor_intrinsics
from tfcompile.backends.tvm.lowering import one_line, primfuncs
from tfcompile.errors import BackendError
from tfcompile.outputs import atomic_write_text

DEFAULT_ROOT_ENV = "TFCOMPILE_TVM_TUNING_DIR"


BUILD_TIMEOUT_S = 180
RUN_TIMEOUT_S = 120
MIN_TRIALS_PER_KERNEL = 4
MIN_GAIN = 0.05
RULES_FILE = "rules.json"


@functools.lru_cache(maxsize=1)
def require_json_serialization() -> None:
    """Raise BackendError unless TVM can serialise IR to JSON, which MetaSchedule's database needs.

    With apache-tvm 0.27.0.post1 and apache-tvm-ffi 0.1.15.post2 (what pip resolves
    today) ``tvm.ir.save_json`` of any IR node segfaults in ``tvm::ffi::ToJSONGraph``:
    an ABI mismatch; apache-tvm-ffi 0.1.14.post0 works. The check runs in a child
    process so that the crash cannot take this one down.
    """
    probe = "import tvm; tvm.ir.save_json(tvm.tirx.IntImm('int32', 1))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
    if result.returncode != 0:
        from importlib.metadata import version

        raise BackendError(f"tvm: MetaSchedule cannot run: TVM's JSON serialisation crashes with "
                           f"apache-tvm-ffi {version('apache-tvm-ffi')} (works with 0.1.14.post0)")


def default_root() -> Path:
    return Path(os.environ.get(DEFAULT_ROOT_ENV, Path.home() / ".cache" / "tfcompile" / "tvm-tuning"))


def target_key(target) -> str:
    """A directory name for ``target``: readable CPU name plus a hash of the whole target."""
    attrs = target.attrs if target.attrs is not None else {}
    cpu = str(attrs.get("mcpu", "generic"))
    digest = hashlib.sha1(str(target).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{target.kind.name}-{cpu}-{digest}")


def database_dir(target, root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None and _is_database(Path(root)) else \
        Path(root or default_root()) / target_key(target)


def has_database(target, root: str | os.PathLike | None = None) -> bool:
    """Whether ``tfcompile tune`` has written a database for ``target`` (under ``root``).

    A database that is there but damaged raises BackendError (``check_database``) rather than
    answering False: compiling must not fall back to the rules without a word.
    """
    _check_root(root)
    path = database_dir(target, root)
    if not (path / WORKLOAD_FILE).exists():
        return False
    check_database(path)
    return True


def check_tuning_database(target, root: str | os.PathLike | None = None) -> None:
    """BackendError, before any work, if the database for ``target`` under ``root`` is unusable."""
    _check_root(root)
    check_database(database_dir(target, root))


def _check_root(root: str | os.PathLike | None) -> None:
    root = Path(root or default_root())
    if root.exists() and not root.is_dir():
        raise BackendError(f"tvm: tuning database root {root} is a file; name a directory "
                           f"(--database or ${DEFAULT_ROOT_ENV})")


def _is_database(path: Path) -> bool:
    return (path / WORKLOAD_FILE).is_file()


WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


def check_database(path: Path) -> None:
    """Refuse a damaged or mistyped database before TVM reads it, naming the file, line and what is wrong.

    The files are JSON lines in MetaSchedule's format: a workload is ``["<structural hash>", "<base64 IR>"]``;
    a record is ``[<workload index>, [trace, run_secs, target, args_info]]``. ``rules.json`` maps a workload
    hash to ``{"rules_s": seconds or null, "best_s": seconds or null}``. Missing files are an empty database.
    """
    if path.exists() and not path.is_dir():
        raise _damaged(path, "is a file, not a directory")
    workloads = 0
    for number, line in _json_lines(path / WORKLOAD_FILE):
        if not (isinstance(line, list) and len(line) == 2 and all(isinstance(x, str) for x in line)
                and line[0].isdigit()):
            raise _damaged(path / WORKLOAD_FILE, f"line {number} is not [\"<structural hash>\", \"<IR>\"]")
        workloads += 1
    for number, line in _json_lines(path / RECORD_FILE):
        if not (isinstance(line, list) and len(line) == 2 and type(line[0]) is int
                and isinstance(line[1], list) and len(line[1]) == 4):
            raise _damaged(path / RECORD_FILE, f"line {number} is not [<workload index>, [trace, run_secs, "
                                               "target, args_info]]")
        if not 0 <= line[0] < workloads:
            raise _damaged(path / RECORD_FILE, f"line {number} names workload {line[0]}; "
                                               f"{WORKLOAD_FILE} has {workloads}")
    _rules_timings(path)


def _damaged(file: Path, what: str) -> BackendError:
    return BackendError(f"tvm: tuning database {file}: {what}; delete it or tune again with `tfcompile tune`")


def _json_lines(file: Path):
    """(line number, value) for each non-empty line of a JSON-lines file (none if it does not exist)."""
    if not file.exists():
        return
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise _damaged(file, f"cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise _damaged(file, "is not UTF-8 text") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise _damaged(file, f"line {number} is not JSON") from exc


def _open(path: Path):
    from tvm.s_tir import meta_schedule as ms

    try:
        path.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(path_workload=str(path / WORKLOAD_FILE),
                                        path_tuning_record=str(path / RECORD_FILE), allow_missing=True)
    except Exception as exc:
        raise _damaged(path, f"TVM cannot read it ({one_line(exc)})") from exc


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """The module MetaSchedule tunes (and hashes) for a kernel: tuning and lookup must agree."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def _workload_key(func: tirx.PrimFunc) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(_workload(func)))


def _rules_timings(path: Path) -> dict[str, dict]:
    """Workload key -> {"rules_s", "best_s"} as the tuner measured them ({} before the first tuning)."""
    file = path / RULES_FILE
    if not file.exists():
        return {}
    try:
        timings = json.loads(file.read_bytes())
    except OSError as exc:
        raise _damaged(file, f"cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise _damaged(file, "is not JSON") from exc
    if not isinstance(timings, dict):
        raise _damaged(file, "is not a JSON object of workload timings")
    for key, timing in timings.items():
        fields_ok = isinstance(timing, dict) and all(
            timing.get(f) is None or (type(timing[f]) in (int, float) and 0 <= timing[f] < float("inf"))
            for f in ("rules_s", "best_s"))
        if not fields_ok:
            raise _damaged(file, f"workload {key}: expected {{\"rules_s\": seconds or null, \"best_s\": seconds or "
                                 f"null}}, found {json.dumps(timing)[:60]}")
    return timings


def _tuned_pays(timing: dict | None) -> bool:
    if not timing or timing.get("rules_s") is None or timing.get("best_s") is None:
        return True  # nothing to compare against (the rules do not match this kernel)
    return timing["best_s"] <= (1 - MIN_GAIN) * timing["rules_s"]


@tvm.transform.module_pass(opt_level=0, name="TfcompileApplyTuned")
class ApplyTuned:
    """Module pass: kernels from tuning records where the database has them, else the rules."""

    def __init__(self, target, root: str | os.PathLike | None = None):
        self.target = target
        self.path = database_dir(target, root)
        self.report = rules.ScheduleReport()
        # Read here, in Python: an error inside tvm.compile would come out wrapped in TVM's own.
        check_database(self.path)
        self.database = None
        if _is_database(self.path):
            require_json_serialization()
            self.database = _open(self.path)
        self.timings = _rules_timings(self.path)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        database, timings = self.database, self.timings
        mod = mod.clone()
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = gvar.name_hint
            sch = None
            if database is not None and _tuned_pays(timings.get(_workload_key(func))):
                sch = database.query_schedule(_workload(func), self.target, workload_name="main")
            if sch is not None:
                tuned = sch.mod["main"].without_attr("global_symbol")
                mod[gvar] = tuned.with_attr("tirx.is_scheduled", True)
                self.report.applied[name] = "tuned"
                continue
            scheduled, rule = rules.schedule_func(func, self.target)
            mod[gvar] = scheduled
            if rule is None:
                self.report.untuned.append(name)
            else:
                self.report.applied[name] = rule
        return mod


def _space():
    """MetaSchedule's LLVM design space, mutating tile sizes and unrolling only.

    With apache-tvm-ffi 0.1.15.post2, ``TuneContext`` initialisation segfaults
    in ``tvm::ffi::ToJSONGraph`` for ``MutateComputeLocation`` and
    ``MutateParallel`` (each on its own, a 64x64 matmul). That is the JSON
    crash ``require_json_serialization`` guards against, so the full default
    set may well work with 0.1.14.post0; it has not been tried there yet.
    """
    from tvm.s_tir import meta_schedule as ms

    mutators = {ms.mutator.MutateTileSize(): 0.9, ms.mutator.MutateUnroll(): 0.1}
    return ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs=mutators)


@dataclasses.dataclass
class TuningResult:
    database: Path
    tuned: dict[str, int]  # kernel -> measured schedules the database holds for it after this call
    reused: list[str]  # kernels the database already had records for: not tuned again
    skipped: list[str]  # kernels the budget did not reach (lightest first to go)
    wall_s: float

    trial_budget: int  # the trials this call was allowed, over all kernels it tuned
    # kernel -> {"rules_s": the rules' schedule as measured by the tuner, "best_s": the best record,
    #            "from_rules": whether the rules' schedule is kept (no record MIN_GAIN faster)}
    outcomes: dict[str, dict] = dataclasses.field(default_factory=dict)


def _flops(func: tirx.PrimFunc) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # data-movement kernels without arithmetic
        return 0.0


def kernels_of(graph, target) -> dict[str, tirx.PrimFunc]:
    """The fused kernels ``compile_graph`` schedules for ``graph``, by name."""
    from tfcompile.backends.tvm import lowering
    from tfcompile.backends.tvm.target import vector_lanes

    mod = lowering.import_graph(graph)
    mod = lowering.guarded("legalize/fuse", graph.name, lowering.legalize_and_fuse, mod, target,
                           pad_multiple=vector_lanes(target))
    return primfuncs(mod)


def _median_s(record) -> float:
    secs = sorted(float(x) for x in record.run_secs)
    return secs[len(secs) // 2]


def _record_rules_schedule(database, func: tirx.PrimFunc, target, builder, runner) -> float | None:
    """Measure the rules' schedule of ``func`` like a trial and store it as a record.

    The database's best record is then never worse than the rules (as the tuner
    measured them), so a small budget cannot make a tuned model slower than
    the untuned one; and the search starts from the rules' schedule.
    """
    from tvm.s_tir import meta_schedule as ms

    workload = _workload(func)
    matched = rules.rule_schedule(workload["main"], target)
    if matched is None:
        return None
    sch, _rule = matched
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        return None
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
    result = future.result()
    if result.error_msg or not result.run_secs:
        return None
    record = ms.database.TuningRecord(sch.trace, database.commit_workload(workload), result.run_secs, target, args_info)
    database.commit_tuning_record(record)
    return _median_s(record)


def _search(trials: int):
    """Evolutionary search sized to the budget.

    MetaSchedule's default population (512 candidates, 4 generations) costs
    minutes of candidate generation per kernel on two cores before the first
    measurement, which dominates small budgets. A population of a few times
    the trials still explores, at a fraction of the cost.
    """
    from tvm.s_tir import meta_schedule as ms

    population = min(512, max(32, 4 * trials))
    return ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population),
                                                 genetic_num_iters=2 if trials < 64 else 4)


def tune_graph(graph, *, target=None, root: str | os.PathLike | None = None, max_trials: int = 64,
               kernels: list[str] | None = None, trials_per_iter: int = 16,
               progress: Callable[[str, int, int], None] = lambda name, done, total: None) -> TuningResult:
    """Tune ``graph``'s fused kernels (all, or those named in ``kernels``) into the target's database.

    ``max_trials`` is the total over the kernels tuned in this call, split evenly
    over the heaviest kernels (by FLOPs) that get at least
    ``MIN_TRIALS_PER_KERNEL`` each; the rest are reported as skipped. A kernel whose workload already has a
    record (from this model, another variant or another model with the same
    shapes) is reused, not tuned again. ``progress(kernel, done, total)`` is
    called before each kernel and once at the end.
    """
    from tvm.s_tir import meta_schedule as ms

    from tfcompile.backends.tvm.target import host_target

    started = time.perf_counter()
    target = target or host_target()
    check_tuning_database(target, root)  # before minutes of tuning, not after
    path = database_dir(target, root)
    funcs = kernels_of(graph, target)
    chosen = {name: f for name, f in funcs.items() if kernels is None or name in kernels}
    if not chosen:
        raise BackendError(f"tvm: {graph.name}: no kernel to tune (kernels: {', '.join(sorted(funcs))})")
    require_json_serialization()
    import_tensor_intrinsics()
    database = _open(path)
    reused = [name for name, f in chosen.items()
              if database.query_schedule(_workload(f), target, workload_name="main") is not None]
    # The budget goes to the heaviest kernels first, at least MIN_TRIALS_PER_KERNEL each.
    pending = sorted((name for name in chosen if name not in reused), key=lambda n: -_flops(chosen[n]))
    room = max(1, max_trials // MIN_TRIALS_PER_KERNEL)
    todo, skipped = {n: chosen[n] for n in pending[:room]}, pending[room:]
    per_kernel = max_trials // max(len(todo), 1)
    tuned: dict[str, int] = {}
    outcomes: dict[str, dict] = {}
    work_dir = path / "logs"
    work_dir.mkdir(parents=True, exist_ok=True)
    # One builder and one runner worker for all kernels: each costs ~10 s to start.
    # The 30 s default build timeout fails every trial on a loaded 2-core machine: a
    # builder worker's start-up alone can take longer.
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S, initializer=import_tensor_intrinsics)
    runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, initializer=import_tensor_intrinsics)
    for index, (name, func) in enumerate(todo.items()):
        progress(name, index, len(todo))
        try:
            task = ms.TuneContext(mod=_workload(func), target=target, space_generator=_space(),
                                  search_strategy=_search(per_kernel), task_name=name, num_threads="physical")
            rules_s = _record_rules_schedule(database, func, target, builder, runner)
            ms.tune.tune_tasks(tasks=[task], task_weights=[1.0], work_dir=str(work_dir),
                               max_trials_global=per_kernel, num_trials_per_iter=min(trials_per_iter, per_kernel),
                               builder=builder, runner=runner, database=database, cost_model="random")
        except Exception as exc:
            raise BackendError(f"tvm: {graph.name}: tuning {name} failed: {one_line(exc)}") from exc
        records = database.get_top_k(database.commit_workload(_workload(func)), 1 << 20)
        tuned[name] = len(records)
        best_s = _median_s(records[0]) if records else None
        timing = {"rules_s": rules_s, "best_s": best_s}
        outcomes[name] = {**timing, "from_rules": not _tuned_pays(timing)}
        timings = _rules_timings(path)
        timings[_workload_key(func)] = timing
        atomic_write_text(path / RULES_FILE, json.dumps(timings, indent=1) + "\n")
    progress("", len(todo), len(todo))
    return TuningResult(path, tuned, sorted(reused), skipped, time.perf_counter() - started, per_kernel * len(todo),
                        outcomes)
