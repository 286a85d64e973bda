"""Quality of the approximate attention passes on a trained decoder: the zoo's ``tiny-decoder`` on held-out text.

Why: ``local_attention`` and ``hard_attention_topk`` are judged by how little they change the model, and
that is only meaningful on a model whose attention was trained (a random-weight GPT-2 attends almost
uniformly). ``tiny-decoder`` is a byte-level GPT-2 trained on the first 95 % of the project's corpus
(``benchmarks/train_tiny_decoder.py``); this script reads the held-out last 5 %, never seen in training.

What: the model is traced through the project's frontend (``load_model("tiny-decoder")``) at
[batch, seq] = [8, 256]; every variant is made by the project's passes (``apply_pass``) on that graph,
and a pass that refuses is recorded with its reason. Every variant and the unmodified graph run on the
same non-overlapping held-out windows of ``seq`` bytes, and for each variant it reports:
- ``top1_agreement``: share of positions whose arg-max next byte equals the unmodified model's (the
  figure ``tfcompile.verify`` uses for logits);
- ``perplexity_per_byte`` on the held-out text (each window's positions 1..seq−1 predicted) and its
  increase over the unmodified model's, in per cent;
- ``mean_kl_nats``: mean KL(unmodified ‖ variant) of the next-byte distributions;
- ``next_byte_accuracy``: share of positions whose arg-max is the true next byte.

The same variants also run on the *random twin*: gpt2-small built with the tiny decoder's configuration and
seeded random weights, as the zoo builds its untrained decoders, to show how much a figure on untrained
attention says (``--no-random-twin`` skips it).

    .venv/bin/python benchmarks/decoder_quality.py
    .venv/bin/python benchmarks/decoder_quality.py --windows 16,32,64,128,256 --sinks 1,0 --topk 8,16,32,64

Writes ``benchmarks/results/decoder_quality_tiny-decoder.json`` (rows, host, versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tfcompile.frontend import LoadOptions, load_model  # noqa: E402
from tfcompile.graph import ModelGraph  # noqa: E402
from tfcompile.passes import apply_pass  # noqa: E402
from tfcompile.provenance import host_line, host_record, versions  # noqa: E402
from train_tiny_decoder import split_bytes, windows  # noqa: E402  (the held-out split the model was trained with)

MODEL = "tiny-decoder"
WEIGHTS = ROOT / "tfcompile" / "frontend" / "weights" / "tiny_decoder"
RANDOM_TWIN = "random twin"
TWIN_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop")


@dataclasses.dataclass
class Outputs:
    logits: list[torch.Tensor]  # one [batch, seq, 256] tensor per held-out batch


def heldout_batches(seq: int, batch: int) -> list[torch.Tensor]:
    """Non-overlapping held-out windows of ``seq`` bytes as [batch, seq] int64 batches (the remainder dropped)."""
    _, held = split_bytes()
    rows = windows(held, seq)
    count = rows.shape[0] // batch
    if count < 1:
        raise SystemExit(f"the held-out text holds {rows.shape[0]} windows of {seq} bytes, fewer than --batch {batch}")
    return [rows[i * batch:(i + 1) * batch] for i in range(count)]


def run(graph: ModelGraph, batches: list[torch.Tensor]) -> Outputs:
    return Outputs([graph.run((ids,))[0].float() for ids in batches])


def figures(reference: Outputs, got: Outputs, batches: list[torch.Tensor]) -> dict:
    """Agreement, perplexity, KL and accuracy of ``got`` (see the module docstring), over every batch."""
    agree = positions = nll = predicted = correct = 0.0
    kl = 0.0
    for ref, out, ids in zip(reference.logits, got.logits, batches):
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        positions += ref.shape[0] * ref.shape[1]
        log_p = out.double().log_softmax(-1)
        ref_log_p = ref.double().log_softmax(-1)
        kl += (ref_log_p.exp() * (ref_log_p - log_p)).sum(-1).sum().item()
        target = ids[:, 1:]
        nll -= log_p[:, :-1].gather(-1, target.unsqueeze(-1)).sum().item()
        correct += (out[:, :-1].argmax(-1) == target).sum().item()
        predicted += target.numel()
    return {"top1_agreement": agree / positions, "perplexity_per_byte": math.exp(nll / predicted),
            "mean_kl_nats": kl / positions, "next_byte_accuracy": correct / predicted}


def variants(args) -> list[tuple[str, str, dict]]:
    out = []
    for window in [int(w) for w in args.windows.split(",") if w]:
        for sinks in [int(s) for s in args.sinks.split(",") if s]:
            out.append((f"local w={window} sinks={sinks}", "local_attention", {"window": window, "sinks": sinks}))
    for k in [int(k) for k in args.topk.split(",") if k]:
        out.append((f"top-k k={k}", "hard_attention_topk", {"k": k}))
    return out


def evaluate(graph: ModelGraph, batches: list[torch.Tensor], args, name: str) -> list[dict]:
    """One row for the unmodified graph and one per variant (its figures, or the pass's refusal)."""
    graph = dataclasses.replace(graph, example_inputs=(batches[0],))  # the passes inspect the real text
    reference = run(graph, batches)
    dense = figures(reference, reference, batches)
    print(f"{name} unmodified: perplexity {dense['perplexity_per_byte']:.3f} per byte, next-byte accuracy "
          f"{dense['next_byte_accuracy']:.3f}", flush=True)
    rows = [{"model": name, "variant": "unmodified", "pass": None, "knobs": {}, "applied": True, "summary": "",
             **dense, "perplexity_increase_pct": 0.0}]
    for label, pass_name, knobs in variants(args):
        variant, outcome = apply_pass(graph, pass_name, **knobs)
        row = {"model": name, "variant": label, "pass": pass_name, "knobs": knobs, "applied": bool(outcome.applied),
               "summary": outcome.reason}
        if outcome.applied:
            row.update(figures(reference, run(variant, batches), batches))
            row["perplexity_increase_pct"] = 100 * (row["perplexity_per_byte"] / dense["perplexity_per_byte"] - 1)
            print(f"  {label:22s} top-1 agreement {row['top1_agreement']:.4f}  perplexity "
                  f"{row['perplexity_per_byte']:.3f} ({row['perplexity_increase_pct']:+.2f} %)  "
                  f"KL {row['mean_kl_nats']:.4f} nats", flush=True)
        else:
            print(f"  {label:22s} refused: {outcome.reason}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256, help="bytes per held-out window (at most 256, the "
                        "model's positions)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--windows", default="16,32,64,128,256", help="local_attention windows")
    parser.add_argument("--sinks", default="1,0", help="local_attention sink tokens (1 is the pass's default)")
    parser.add_argument("--topk", default="8,16,32,64", help="hard_attention_topk k values")
    parser.add_argument("--no-random-twin", action="store_true", help="skip the same variants on an untrained "
                        "GPT-2 of the same configuration (seeded weights, as gpt2-small is built)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / f"decoder_quality_{MODEL}.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    batches = heldout_batches(args.seq, args.batch)
    rows_used = len(batches) * args.batch
    print(f"{MODEL}: {rows_used} held-out windows of {args.seq} bytes (batch {args.batch}); host {host_line()} "
          f"(2 cores shared with other work)")
    options = LoadOptions(batch=args.batch, seq=args.seq)
    graph = load_model(MODEL, options)
    rows = evaluate(graph, batches, args, MODEL)
    if not args.no_random_twin:
        config = {key: value for key, value in json.loads((WEIGHTS / "config.json").read_text()).items()
                  if key in TWIN_KEYS}
        twin = load_model("gpt2-small", dataclasses.replace(options, config_overrides=config))
        rows += evaluate(twin, batches, args, RANDOM_TWIN)
    elapsed_s = time.perf_counter() - t0
    print()
    print(f"held-out text, windows of {args.seq} bytes; {RANDOM_TWIN}: {MODEL}'s configuration, untrained")
    print("| model | variant | top-1 agreement | perplexity/byte | increase | KL nats |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["applied"]:
            print(f"| {r['model']} | {r['variant']} | {r['top1_agreement']:.4f} | {r['perplexity_per_byte']:.3f} | "
                  f"{r['perplexity_increase_pct']:+.2f} % | {r['mean_kl_nats']:.4f} |")
        else:
            print(f"| {r['model']} | {r['variant']} | refused: {r['summary']} | | | |")
    print(f"\nhost: {host_line()} (shared); {elapsed_s:.0f} s")
    record = {"model": MODEL, "seq": args.seq, "batch": args.batch, "heldout_windows": rows_used,
              "text": "last 5 % of characters of tfcompile.corpus.running_text(), never trained on",
              "random_twin": f"{RANDOM_TWIN}: gpt2-small built with {MODEL}'s config.json, seeded random weights",
              "rows": rows, "host": host_record(), "host_line": host_line(),
              "host_note": "2 cores shared with other work", "versions": versions(), "elapsed_s": round(elapsed_s, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
