"""Predicted against measured latency over many variants.

For each variant: the calibrated prediction (profile for target x backend),
the uncalibrated roofline, a FLOPs-only baseline, and the measured median.
Scores per predictor: MAPE, share within ±10 %, Kendall τ of the ranking;
and speed-up fidelity: each variant's predicted against measured speed-up over
the baseline at its shape, in percentage points (``speedup_scores``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Callable

from tfcompile.cost_models import load_device
from tfcompile.cost_models.model import CalibratedCostModel, CostModel, RooflineCostModel
from tfcompile.graph import ModelGraph
from tfcompile.measure import measure_here, measure_remote
from tfcompile.outputs import atomic_path, atomic_paths, check_output_dir

PREDICTORS = ("calibrated", "roofline", "flops_only")


@dataclasses.dataclass
class ComparisonRow:
    name: str
    measured_ms: float
    predicted_ms: dict[str, float]  # per predictor
    # The timed runs behind ``measured_ms``, per pass over the set, in the order they ran: a variant timed
    # round-robin with its baseline has as many passes as it (``measured_speedup``).
    samples_ms: tuple[tuple[float, ...], ...] = ()


def measured_speedup(row: ComparisonRow, baseline: ComparisonRow) -> float:
    """``baseline``'s time over ``row``'s: per pass, the ratio of their medians over the turns they shared,
    and the median of that over the passes; the ratio of their ``measured_ms`` when their runs were not
    timed together.

    Both medians of a pass cover the same turns, so a drift of the shared
    host's speed hits them alike, and a median shrugs off a spike that hits
    one run; the ratio of two lowest medians can mix passes minutes apart (two
    identical ORT graphs measured 0.90x that way on session 13's Xeon). A
    run-by-run ratio does not shrug off spikes: on TVM, llama-tiny's cleanup
    measured 0.93x that way (four spikes on one side) against 0.99x by medians."""
    passes = [(b, v) for b, v in zip(baseline.samples_ms, row.samples_ms) if b and v and len(b) == len(v)]
    if passes and len(baseline.samples_ms) == len(row.samples_ms) == len(passes):
        return statistics.median(statistics.median(b) / statistics.median(v) for b, v in passes)
    return baseline.measured_ms / row.measured_ms


def measure_and_predict(graphs: list[ModelGraph], *, cost_model: CostModel, repeat: int = 10,
                        progress: Callable[[str], None] = lambda _: None,
                        remote=None, group_key: Callable[[ModelGraph], object] | None = None,
                        **torch_options: str) -> list[ComparisonRow]:
    """Measure every graph on ``cost_model``'s backend (or on ``remote``) and predict it with every predictor.

    ``remote`` (a tvm.remote.RemoteSpec): measure with TVM on that device,
    variants in parallel over its servers. ``group_key``: consecutive graphs
    with the same key (variants of one model and shape) are lowered together
    and timed round-robin, so that a slow spell of the machine hits all of
    them alike instead of one. ``torch_options``: ``device``/``mode``/``precision`` for backend torch
    (``measure.measure_here``); at bf16 or fp16 each variant is predicted as that precision's cast graph.
    """
    if remote is not None:
        named = {f"{i}:{g.name}": g for i, g in enumerate(graphs)}
        timed = measure_remote(named, remote, cost_model.device.name, repeat=repeat, progress=progress)
        return [ComparisonRow(g.name, timed[key].measurement.median_ms, predict_all(g, cost_model),
                              _samples_ms(timed[key].measurement)) for key, g in named.items()]
    rows = []
    done = 0
    with tempfile.TemporaryDirectory(prefix="tfcompile-compare-") as workdir:
        for _, group in itertools.groupby(graphs, key=group_key or id):
            group = list(group)
            named = {f"{done + i}:{g.name}": g for i, g in enumerate(group)}
            label = f"[{done + 1}-{done + len(group)}/{len(graphs)}]"
            timed = measure_here(named, cost_model.backend, Path(workdir), repeat=repeat,
                                 progress=lambda m, label=label: progress(f"{label} {m}"), **torch_options)
            rows += [ComparisonRow(g.name, timed[key].measurement.median_ms,
                                   predict_all(_at_precision(g, torch_options.get("precision")), cost_model),
                                   _samples_ms(timed[key].measurement))
                     for key, g in named.items()]
            done += len(group)
    return rows


def builtin_variant_graphs(model: str, batches: list[int], seqs: list[int], seed: int = 0) -> list[ModelGraph]:
    """The built-in variants of ``model`` at every batch x sequence shape, one shape after another.

    Named "MODEL bB sS VARIANT", so that the name less its last word identifies the shape."""
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.variants import BUILTIN_VARIANTS, build_variant

    graphs = []
    for batch in batches:
        for seq in seqs:
            original = load_model(model, LoadOptions(batch=batch, seq=seq, seed=seed))
            for spec in BUILTIN_VARIANTS:
                variant = build_variant(original, spec)
                variant.graph.name = f"{original.name} b{batch} s{seq} {spec.name}"
                graphs.append(variant.graph)
    return graphs


def _samples_ms(measurement) -> tuple[tuple[float, ...], ...]:
    return (tuple(s * 1e3 for s in measurement.samples_s),)


def lowest_of_passes(passes: list[list[ComparisonRow]]) -> list[ComparisonRow]:
    """Per variant (by name, in the first pass's order), the lowest measured median, with the timed runs of
    every pass (``samples_ms``, one tuple per pass).

    Measuring the whole set more than once, minutes apart, and keeping each
    variant's lowest median takes out spells of load from the other tenants of
    a shared host, which only ever add time; the cost model predicts the
    undisturbed latency. Speed-ups are taken pass by pass (``measured_speedup``), not from two such medians.
    """
    best: dict[str, ComparisonRow] = {}
    samples: dict[str, tuple[tuple[float, ...], ...]] = {}
    for rows in passes:
        for row in rows:
            samples[row.name] = samples.get(row.name, ()) + row.samples_ms
            if row.name not in best or row.measured_ms < best[row.name].measured_ms:
                best[row.name] = row
    return [dataclasses.replace(best[row.name], samples_ms=samples[row.name]) for row in passes[0]]


def predict_all(graph: ModelGraph, cost_model: CostModel) -> dict[str, float]:
    """Milliseconds per predictor: the device's roofline always; calibrated and FLOPs-only with a profile."""
    predicted = {"roofline": RooflineCostModel(cost_model.device, cost_model.backend).predict(graph).latency_s * 1e3}
    if isinstance(cost_model, CalibratedCostModel):
        predicted["calibrated"] = cost_model.predict(graph).latency_s * 1e3
        predicted["flops_only"] = cost_model.profile.predict_flops_only_s(graph) * 1e3
    return predicted


def _at_precision(graph: ModelGraph, precision: str | None) -> ModelGraph:
    """The graph as it runs at ``precision`` (parameters and float inputs cast), for the cost model."""
    if precision in (None, "fp32", "tf32"):
        return graph
    from tfcompile.backends.torch_device import cast_graph

    return cast_graph(graph, precision)


def score(rows: list[ComparisonRow]) -> dict[str, dict[str, float]]:
    from scipy.stats import kendalltau

    scores = {}
    measured = [r.measured_ms for r in rows]
    for predictor in PREDICTORS:
        if not all(predictor in r.predicted_ms for r in rows):
            continue
        predicted = [r.predicted_ms[predictor] for r in rows]
        errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
        tau = kendalltau(predicted, measured).statistic if len(rows) > 1 else float("nan")
        scores[predictor] = {"mape": sum(errors) / len(errors),
                             "within_10pct": sum(e <= 0.10 for e in errors) / len(errors),
                             "kendall_tau": float(tau)}
    return scores


def speedup_scores(rows: list[ComparisonRow]) -> dict[str, dict]:
    """Per predictor: how well it predicts each variant's speed-up over the baseline at the same shape
    (measured: ``measured_speedup``).

    The ranking that matters is of a model's variants against each other, so
    a variant that measures 1.37x faster must not be predicted 1.01x: for
    every variant with a baseline row of the same model and shape, predicted speed-up
    (baseline predicted / variant predicted) against measured, the error in
    percentage points of speed-up, their median, and the variant furthest off."""
    # "minilm b8 s128 cleanup": the variant is the last word, the model and shape the rest.
    baselines = {row.name.rsplit(" ", 1)[0]: row for row in rows if row.name.rsplit(" ", 1)[-1] == "baseline"}
    pairs = [(row, baselines[group]) for row in rows for group, variant in [_group_and_variant(row.name)]
             if variant != "baseline" and group in baselines]
    scores = {}
    for predictor in PREDICTORS:
        if not pairs or not all(predictor in r.predicted_ms for r, _ in pairs):
            continue
        errors = []
        for row, base in pairs:
            measured = measured_speedup(row, base)
            predicted = base.predicted_ms[predictor] / row.predicted_ms[predictor]
            errors.append((abs(predicted - measured) * 100, row.name, predicted, measured))
        worst = max(errors)
        scores[predictor] = {"median_error_pp": float(statistics.median(e[0] for e in errors)),
                             "variants": len(errors),
                             "worst": {"variant": worst[1], "predicted_speedup": worst[2],
                                       "measured_speedup": worst[3]}}
    return scores


def _group_and_variant(name: str) -> tuple[str, str]:
    group, _, variant = name.rpartition(" ")
    return group, variant


def check_compare_options(target: str, output_dir: Path) -> None:
    """What can fail before anything is measured: an unknown target, an -o that cannot be written."""
    load_device(target)
    check_output_dir(output_dir)


def write_outputs(rows: list[ComparisonRow], scores: dict, out_dir: Path, *, title: str,
                  measured_with: dict | None = None, host_readings: dict | None = None, explained=()) -> None:
    """compare.json and compare.png, replaced together once both are complete.

    ``measured_with``: how the variants ran (torch's device, mode and precision), recorded as such;
    ``host_readings``: how fast the host ran around the measurement (``compare_run.CompareRun.host_readings``);
    ``explained``: the variants furthest off split per group of ops (``explain.Explanation``)."""
    payload = {"title": title, **({"measured_with": measured_with} if measured_with else {}),
               **(host_readings or {}), "scores": scores,
               "speedups": speedup_scores(rows), "variants": [dataclasses.asdict(r) for r in rows],
               **({"explained": [dataclasses.asdict(e) for e in explained]} if explained else {})}
    with atomic_paths(out_dir / "compare.json", out_dir / "compare.png") as (json_tmp, png_tmp):
        json_tmp.write_text(json.dumps(payload, indent=2) + "\n")
        plot(rows, png_tmp, title=title)


def plot(rows: list[ComparisonRow], path: Path, *, title: str) -> None:
    """Predicted against measured latency, a panel per predictor, each point labelled "v1 8x128"."""
    from tfcompile import plots

    labels, key = row_labels(rows)
    figure = plots.predicted_vs_measured(rows, score(rows), title=title, labels=labels, key=key)
    with atomic_path(path) as tmp:
        plots.save(figure, tmp)


def row_labels(rows: list[ComparisonRow]) -> tuple[list[str], dict[str, str]]:
    """Each row's short label ("v1 8x128"), as the plot and the table show it, and the key to the ids."""
    from tfcompile import plots

    shapes = [_variant_and_shape(row.name) for row in rows]
    ids = plots.variant_ids([variant for variant, _ in shapes])
    labels = [f"{ids[variant]} {shape}".strip() for variant, shape in shapes]
    return labels, {short: variant for variant, short in ids.items()}


def _variant_and_shape(name: str) -> tuple[str, str]:
    """("cleanup", "8x128") from "minilm b8 s128 cleanup" (builtin_variant_graphs' names); (name, "") otherwise."""
    match = re.search(r"(?:^| )b(\d+) s(\d+) (\S+)$", name)
    return (match[3], f"{match[1]}x{match[2]}") if match else (name, "")
