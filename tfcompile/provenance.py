"""Where a figure comes from: the host that measured it and the versions of the stack that ran it.

Read without importing torch, ONNX Runtime or TVM (package metadata and
/proc), so recording provenance costs nothing on a run that never needed them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from tfcompile.cost_models.device import ISA_FLAGS, detect_host, last_level_cache_bytes

PACKAGES = ("tfcompile", "torch", "onnx", "onnxruntime", "onnxscript", "apache-tvm", "transformers", "numpy")


def host_record() -> dict:
    """The measuring host: CPU model, cores this process may use, ISA extensions, last-level cache, OS."""
    host = detect_host()
    return {
        "cpu": host.model,
        "cores": host.cores,
        "isa": [flag for flag in ISA_FLAGS if flag in host.flags],
        "last_level_cache_bytes": int(last_level_cache_bytes()),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "threads_env": {name: os.environ[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                        if name in os.environ},
    }


def host_line(record: dict | None = None) -> str:
    """One line for a table's caption: 'AMD EPYC 7B13, 2 cores, AVX2, L3 32 MiB'."""
    record = record or host_record()
    isa = ("AVX-512" if "avx512f" in record["isa"] else "AVX2" if "avx2" in record["isa"]
           else "SVE" if "sve" in record["isa"] else "NEON" if "asimd" in record["isa"] else "no AVX2")
    cache = record["last_level_cache_bytes"]
    cache_text = f", LLC {cache / 2**20:.0f} MiB" if cache else ""
    return f"{record['cpu']}, {record['cores']} cores, {isa}{cache_text}"


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that make or run the model (None: not installed)."""
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = sys.version.split()[0]
    return found
