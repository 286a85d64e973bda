"""The ``optimize --generate`` table: TTFT and TPOT, predicted and measured, per variant.

One short row per variant as in ``report_table`` (ids, a legend of passes
underneath, rejected rows dimmed with their reason), with the two phases
side by side: time to first token (the prefill) and time per output token
(one decode step), then the tokens column, which says whether the variant's
greedy tokens equal Hugging Face ``generate``'s. Under the table: each
phase's prediction against its measurement, and why the devices rank as
they do (the prefill is compute-bound, the decode step memory-bound).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tfcompile.report import VariantReport
from tfcompile.report_table import wrapped, legend, status_of


def render_generation_table(variants: list[VariantReport], target: str, console: Console, *, title: str,
                            caption: str) -> None:
    shown = [v for v in variants if v.folded_into is None]
    measured = any(v.generation.get("measured") for v in shown)
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False,
                  caption=Text(caption), caption_justify="left")
    for name in ("id", "status"):
        table.add_column(name, no_wrap=True)
    columns = ["TTFT pred", "meas", "TPOT pred", "meas", "tok/s"] if measured else ["TTFT pred", "TPOT pred"]
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("tokens", no_wrap=True)
    for v in shown:
        predicted = v.generation["predicted"][target]
        timing = v.generation.get("measured")
        row = [v.id, status_of(v, variants), f"{predicted['ttft_ms']:.1f}"]
        if measured:
            row.append(f"{timing['ttft_ms']['median']:.1f}" if timing else "")
        row.append(f"{predicted['tpot_ms']:.2f}")
        if measured:
            row += [f"{timing['tpot_ms']['median']:.2f}" if timing else "",
                    f"{timing['tokens_per_s']:.0f}" if timing else ""]
        row.append("same" if v.generation["tokens_identical"] else "differ")
        table.add_row(*(Text(cell) for cell in row), style=None if v.eligible else "dim")
    console.print(table)
    for line in legend(variants) + accuracy_lines(variants, target) + bound_lines(variants, target):
        console.print(wrapped(line, console.width, indent=6), highlight=False, markup=False)


def accuracy_lines(variants: list[VariantReport], target: str) -> list[str]:
    """Per measured variant: each phase's prediction as a multiple of its measurement."""
    lines = []
    for v in variants:
        timing = v.generation.get("measured")
        if not timing:
            continue
        predicted = v.generation["predicted"][target]
        ttft, tpot = (predicted[f"{k}_ms"] / timing[f"{k}_ms"]["median"] for k in ("ttft", "tpot"))
        lines.append(f"{v.id:>4}  predicted/measured: TTFT {ttft:.2f}x, TPOT {tpot:.2f}x")
    return lines


def bound_lines(variants: list[VariantReport], target: str) -> list[str]:
    """What bounds each phase on the target, and how the other targets' rooflines rank the baseline."""
    baseline = next((v for v in variants if v.name == "baseline"), None)
    if baseline is None:
        return []
    predicted = baseline.generation["predicted"]
    mine = predicted[target]
    lines = [f"      on {target} the prefill is {mine['prefill_bound']}-bound and a decode step "
             f"{mine['decode_bound']}-bound (FLOPs per byte against the device's ridge point)"]
    others = sorted(predicted.items(), key=lambda item: item[1]["tpot_ms"])
    ranking = ", ".join(f"{name} {p['ttft_ms']:.1f}/{p['tpot_ms']:.2f}" for name, p in others)
    lines.append(f"      baseline TTFT/TPOT ms by target, fastest decode first ({target}: this run's cost model; "
                 f"others: their rooflines): {ranking}")
    return lines


def show_generation(result, target: str, console: Console, *, host: str | None) -> None:
    """The ranked generation variants, for the CLI (``on_ranked``)."""
    generation = result.graphs
    title = (f"{result.graphs.prefill.name.removesuffix('-prefill')} generating on {target}: batch "
             f"{generation.cache.batch}, prompt {generation.prompt_len}, cache {generation.cache.max_len}")
    caption = f"predicted: {result.prediction.get('text', '')}"
    if host:
        caption += f"; measured: {host}"
    caption += "; ms; tokens: greedy tokens vs Hugging Face generate"
    render_generation_table(result.reports, target, console, title=title, caption=caption)
