"""Prepacking on ONNX Runtime CPU: TTFT of the packed prefill against the left-padded batched prefill.

A batch of ``--batch`` prompts with lengths drawn from a long-tailed
distribution (log-normal, median 64 tokens, sigma 1, seeded, clipped to
[8, ``--max-prompt``], the longest set to ``--max-prompt`` so the padded batch
is ``batch x max-prompt``) is prefilled two ways, both exported to ONNX and
run with every input and output bound to pre-allocated buffers:

- **padded**: ``generation.trace``'s prefill over ``[B, P]``, left-padded.
- **prepacked**: ``generation.prepack``'s packed prefill over ``[R, P]`` rows
  (first-fit decreasing, capacity = the longest prompt), cache unpacked in the
  graph into the same ``[B, H, max_len, D]`` layout.

TTFT = prefill + the argmax of its logits. The two runs alternate in one
process (the order flips every round, so neither always runs on a warm or cold
cache), and the ratio is taken per round as well as of the medians. The decode
steps after either prefill are the same graph on the same cache layout, so
only TTFT differs; a greedy generation of ``--new-tokens`` through the ONNX
prefill and decode step checks that both paths produce the same tokens
(``--hf`` also compares with Hugging Face ``generate``).

The ideal speed-up of a dense-masked packed prefill is the token ratio
``B x P / (R x P)`` = ``B / R``: GEMM work follows the tokens, and attention over
a packed row costs as much as over a padded one (``P^2`` scores), of which
there are ``R`` instead of ``B``.

Figures are "shared": the machine's 2 cores are shared with other sessions.

    .venv/bin/python benchmarks/generation_prepack.py            # gpt2-small, 8 prompts up to 512
    .venv/bin/python benchmarks/generation_prepack.py --smoke    # 2 layers, 3 rounds: a quick check
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tfcompile.backends.ort import OrtModel, default_threads, export_onnx
from tfcompile.backends.timing import Spread
from tfcompile.frontend import zoo
from tfcompile.generation.greedy import greedy_generate, hf_greedy, left_pad
from tfcompile.generation.prepack import (INPUT_NAMES, first_fit_decreasing, packed_inputs, prefill_runner,
                                          trace_prepacked_prefill)
from tfcompile.generation.trace import trace_generation
from tfcompile.provenance import host_line, host_record, versions

RESULTS = Path(__file__).resolve().parent / "results"


def long_tailed_lengths(batch: int, max_prompt: int, seed: int) -> list[int]:
    """Log-normal prompt lengths (median 64, sigma 1), clipped to [8, max_prompt], the longest = max_prompt."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(64), 1.0, batch)), 8, max_prompt).astype(int)
    lengths[int(np.argmax(lengths))] = max_prompt
    return [int(n) for n in lengths]


class BoundPrefill:
    """One prefill session with its inputs and outputs bound to numpy buffers: ``run`` times prefill + argmax."""

    def __init__(self, model: OrtModel, inputs: dict[str, np.ndarray]):
        self.session, self.binding = model.session, model.session.io_binding()
        self.inputs = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        self.outputs = {o.name: np.zeros(o.shape, dtype=np.float32) for o in self.session.get_outputs()}
        for name, array in self.inputs.items():
            self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in self.outputs.items():
            self.binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def run(self) -> tuple[float, np.ndarray]:
        """Seconds of one prefill plus the argmax of its logits, and the first tokens."""
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        tokens = self.outputs["logits"].argmax(-1)
        return time.perf_counter() - start, tokens


def interleaved_ttft(padded: BoundPrefill, packed: BoundPrefill, *, rounds: int, warmup: int) -> dict:
    """TTFT in ms of each path over ``rounds`` alternating rounds (after ``warmup`` untimed ones)."""
    times: dict[str, list[float]] = {"padded": [], "prepacked": []}
    firsts = set()
    for i in range(warmup + rounds):
        order = [("padded", padded), ("prepacked", packed)]
        for name, bound in (order if i % 2 == 0 else order[::-1]):
            seconds, tokens = bound.run()
            firsts.add((name, tuple(tokens.tolist())))
            if i >= warmup:
                times[name].append(seconds * 1e3)
    same_first = len({tokens for _, tokens in firsts}) == 1
    ratios = [a / b for a, b in zip(times["padded"], times["prepacked"])]
    return {"padded_ms": Spread.of(times["padded"]), "prepacked_ms": Spread.of(times["prepacked"]),
            "ratio_per_round": Spread.of(ratios), "first_tokens_identical": same_first,
            "samples_ms": times}


def output_difference(padded: BoundPrefill, packed: BoundPrefill, mask: np.ndarray) -> dict[str, float]:
    """Largest |difference| of the logits, and of the cache at every real token's slot (after one run of each)."""
    batch, _, slots, _ = padded.outputs["present_key_0"].shape
    real = np.zeros((batch, slots), dtype=bool)
    real[:, : mask.shape[1]] = mask.astype(bool)
    cache = max(float(np.abs(padded.outputs[n] - packed.outputs[n]).transpose(0, 2, 1, 3)[real].max())
                for n in padded.outputs if n.startswith("present_"))
    return {"logits_max_abs": float(np.abs(padded.outputs["logits"] - packed.outputs["logits"]).max()),
            "cache_max_abs_at_real_slots": cache}


def greedy_tokens(padded: OrtModel, packed: OrtModel, decode: OrtModel, spec, plan, prompts, new_tokens: int):
    """Greedy tokens after each prefill through the same ONNX decode step."""
    ids, mask = left_pad(prompts)
    by_padded = greedy_generate(padded.run, decode.run, spec, ids, mask, new_tokens=new_tokens)
    by_packed = greedy_generate(prefill_runner(packed.run, packed_inputs(plan, prompts)), decode.run, spec, ids,
                                mask, new_tokens=new_tokens)
    return by_padded, by_packed


def _override(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    return key, int(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--override", type=_override, action="append", default=[],
                        help="config override KEY=INT (e.g. n_layer=2)")
    parser.add_argument("--smoke", action="store_true", help="n_layer=2 and 3 rounds: a quick check")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, the token ids and the weights")
    parser.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")],
                        help="explicit prompt lengths (comma-separated) instead of drawn ones")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens for the token check")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs both paths once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--hf", action="store_true", help="also compare the tokens with Hugging Face generate")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/generation_prepack_<model>.json")
    args = parser.parse_args()
    if args.smoke:
        args.override = [("n_layer", 2), *args.override]
        args.rounds = min(args.rounds, 3)
    tag = f"{args.model}{'-smoke' if args.smoke else ''}"
    args.json = args.json or RESULTS / f"generation_prepack_{tag}.json"
    return args


def main() -> None:
    args = parse_args()
    model = zoo.build(args.model, seed=args.seed, config_overrides=dict(args.override)).model
    lengths = args.lengths or long_tailed_lengths(args.batch, args.max_prompt, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    plan = first_fit_decreasing(lengths)
    max_len = plan.prompt_len + args.new_tokens - 1
    print(f"host: {host_line()}  (SHARED machine: other sessions use its cores)")
    print(f"prompt lengths {lengths}; packed rows of {plan.capacity}: "
          f"{[[lengths[p] for p in row] for row in plan.rows]}")

    started = time.time()
    graphs = trace_generation(model, batch=plan.batch, prompt_len=plan.prompt_len, max_len=max_len,
                              name=args.model)
    packed_graph = trace_prepacked_prefill(model, plan, max_len=max_len, name=args.model)
    ids, mask = left_pad(prompts)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(graph, Path(tmp) / f"{name}.onnx", external_data=True) for name, graph in
                 [("padded", graphs.prefill), ("prepacked", packed_graph), ("decode", graphs.decode)]}
        sessions = {name: OrtModel(path, threads=args.threads) for name, path in paths.items()}
        print(f"trace + ONNX export: {time.time() - started:.0f} s")
        padded = BoundPrefill(sessions["padded"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        packed = BoundPrefill(sessions["prepacked"], {name: t.numpy() for name, t in
                                                      zip(INPUT_NAMES, packed_inputs(plan, prompts))})
        timing = interleaved_ttft(padded, packed, rounds=args.rounds, warmup=args.warmup)
        difference = output_difference(padded, packed, mask.numpy())
        by_padded, by_packed = greedy_tokens(sessions["padded"], sessions["prepacked"], sessions["decode"],
                                             graphs.cache, plan, prompts, args.new_tokens)
    tokens_match = bool(torch.equal(by_padded, by_packed))
    hf_match = bool(torch.equal(by_packed, hf_greedy(model, ids, mask, new_tokens=args.new_tokens))) \
        if args.hf else None
    report(args, plan, timing, difference, tokens_match, hf_match)


def report(args, plan, timing: dict, difference: dict, tokens_match: bool, hf_match: bool | None) -> None:
    counts = plan.token_counts()
    padded, packed, ratio = timing["padded_ms"], timing["prepacked_ms"], timing["ratio_per_round"]

    def spread(s: Spread, unit: str) -> str:
        return f"{s.median:9.2f} {unit}  (p10 {s.p10:.2f}, p90 {s.p90:.2f}, n={s.runs})"

    overrides = f" {dict(args.override)}" if args.override else ""
    print(f"\n{args.model}{overrides} (seeded random weights, fp32), {plan.batch} prompts, ONNX Runtime CPU, "
          f"{args.threads} threads, IO binding, {args.rounds} interleaved rounds. SHARED machine.")
    rows = [
        ("prefill tokens padded B x P", f"{counts['padded_tokens']:9d}  ({counts['padding_fraction']:.0%} padding)"),
        ("prefill tokens packed R x C", f"{counts['packed_tokens']:9d}  ({counts['rows']} rows, "
                                        f"{counts['packed_fill']:.0%} filled)"),
        ("ideal speed-up (token ratio B/R)", f"{counts['token_ratio_padded_over_packed']:9.2f}x"),
        ("TTFT padded (prefill + argmax)", spread(padded, "ms")),
        ("TTFT prepacked (prefill + unpack + argmax)", spread(packed, "ms")),
        ("speed-up, ratio of medians", f"{padded.median / packed.median:9.2f}x"),
        ("speed-up per round", spread(ratio, "x ")),
        ("max |logits difference|", f"{difference['logits_max_abs']:9.2e}"),
        ("max |cache difference| at real slots", f"{difference['cache_max_abs_at_real_slots']:9.2e}"),
        ("first tokens identical (every timed run)", "yes" if timing["first_tokens_identical"] else "NO"),
        (f"greedy tokens ({args.new_tokens}) identical to padded path", "yes" if tokens_match else "NO"),
    ]
    if hf_match is not None:
        rows.append(("greedy tokens identical to HF generate", "yes" if hf_match else "NO"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": args.model, "overrides": dict(args.override), "shared_machine": True, "host": host_record(),
        "host_line": host_line(), "versions": versions(), "threads": args.threads, "rounds": args.rounds,
        "warmup": args.warmup, "seed": args.seed, "prompt_lengths": list(plan.lengths),
        "rows": [list(row) for row in plan.rows], "capacity": plan.capacity, "token_counts": counts,
        "ttft_padded_ms": padded.as_dict(), "ttft_prepacked_ms": packed.as_dict(),
        "speedup_median_ratio": padded.median / packed.median, "speedup_per_round": ratio.as_dict(),
        "samples_ms": timing["samples_ms"], "output_difference": difference,
        "first_tokens_identical": timing["first_tokens_identical"], "new_tokens": args.new_tokens,
        "tokens_match_padded": tokens_match, "tokens_match_hf": hf_match}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
