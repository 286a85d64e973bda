import os

import pytest


def _own_cpus_per_worker() -> None:
    """Under pytest-xdist, each worker runs on its own share of the CPUs.

    Unpinned, two workers on a 2-core host each start torch, ONNX Runtime and TVM thread pools as wide as the
    machine, and ORT's spinning threads wait on cores the other worker is computing on. The package sizes
    every pool from the process's CPU affinity (``backends.ort.default_threads``, ``tvm.target.host_cores``),
    so pinning the worker, before torch is imported, sizes them all; subprocesses inherit it.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cpus, index, workers = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    if len(cpus) < workers:
        return
    share = len(cpus) // workers
    mine = cpus[index * share:(index + 1) * share] if index < workers else cpus
    os.sched_setaffinity(0, mine)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[name] = str(len(mine))


_own_cpus_per_worker()


@pytest.fixture(autouse=True)
def isolated_profiles(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's calibration profiles or TVM tuning databases."""
    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(tmp_path_factory.mktemp("tvm-tuning")))
