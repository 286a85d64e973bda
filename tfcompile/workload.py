"""The workload a deployed model serves: the batches it will see and their shares.

A workload is a weighted set of *scenarios*, each one batch shape ``[batch,
seq]`` and, for a ragged batch, the valid length of every row. It comes from
the command line (``--batch 1,8 --seq 16..512``: every combination, equally
weighted) or from a length distribution (``--lengths-file``: one request
length per line, or ``LENGTH COUNT`` histogram lines, e.g. taken from
production logs). Requests from a distribution are batched ``batch`` at a
time and padded to ``--seq``, the way a server with a fixed input shape
batches them; the scenarios are a few seeded draws of such batches, so the
same file and seed always give the same workload.

The search objective is the expected latency over the scenarios (weights
normalised to sum to one), not the latency of one shape. Everything here is
input from the user: sizes are checked before anything is allocated, and a
bad value is one ``InvalidOptionError`` naming the option and the line.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from tfcompile.errors import InvalidOptionError

MAX_SCENARIOS = 16  # each scenario rebuilds and prices every ranked variant once
MAX_DIMENSION = 1 << 20  # no batch or sequence length of a real deployment comes near this
MAX_LENGTHS_FILE_BYTES = 16 << 20
BATCHES_PER_BATCH_SIZE = 4  # seeded draws from a length distribution, per batch size


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One batch the deployed model sees, and its share of all batches."""

    batch: int
    seq: int  # the padded length: the input's second dimension
    lengths: tuple[int, ...] | None = None  # valid tokens per row of a right-padded batch; None: all valid
    weight: float = 1.0

    @property
    def valid_tokens(self) -> int:
        return sum(self.lengths) if self.lengths is not None else self.batch * self.seq

    @property
    def label(self) -> str:
        shape = f"b{self.batch}s{self.seq}"
        return shape if self.lengths is None else f"{shape} ({self.valid_tokens} valid)"


@dataclasses.dataclass(frozen=True)
class Generation:
    """A generation loop: one prefill over ``prompt_len`` tokens, then ``new_tokens - 1`` decode steps.

    The prefill yields the first new token, each decode step one more, over a
    static cache of ``max_len`` slots (see ``tfcompile.generation.trace``)."""

    prompt_len: int
    new_tokens: int

    def __post_init__(self):
        for option, value, low in (("--prompt-len", self.prompt_len, 1), ("--new-tokens", self.new_tokens, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_DIMENSION:
                raise InvalidOptionError(f"{option} must be a whole number from {low} to {MAX_DIMENSION} "
                                         f"(got {value!r})")

    @property
    def max_len(self) -> int:
        """Cache slots: the prompt and every new token but the last (which is never fed back)."""
        return self.prompt_len + self.new_tokens - 1

    def time_s(self, ttft_s: float, tpot_s: float) -> float:
        """One whole generation's time: the first token, then one decode step per further token."""
        return ttft_s + (self.new_tokens - 1) * tpot_s

    def describe(self) -> str:
        return f"prompt {self.prompt_len}, {self.new_tokens} new tokens"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the variants are optimised for.

    ``lengths``: valid lengths of the traced, right-padded batch (the padding
    passes specialise to them); None when it is dense. ``scenarios``: the
    batches the deployment serves; empty when the traced shape is all there is.
    ``generation``: set when the model runs as a generation loop (``optimize
    --generate``); the passes then see a prefill graph and a decode-step graph.
    """

    lengths: tuple[int, ...] | None = None
    scenarios: tuple[Scenario, ...] = ()
    generation: Generation | None = None  # a decoder's generation loop (prefill + decode steps); None: one pass

    @property
    def is_single_shape(self) -> bool:
        return len(self.scenarios) <= 1

    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.scenarios)
        return [s.weight / total for s in self.scenarios]

    def expected(self, values: list[float]) -> float:
        """The workload's expectation of one value per scenario (e.g. latency_s)."""
        if len(values) != len(self.scenarios):
            raise ValueError(f"{len(values)} values for {len(self.scenarios)} scenarios")
        return sum(w * v for w, v in zip(self.weights(), values))

    def describe(self) -> str:
        if not self.scenarios:
            return "the traced shape"
        return ", ".join(f"{s.label} {w:.0%}" for s, w in zip(self.scenarios, self.weights()))


def parse_sizes(text: str, option: str) -> list[int]:
    """``1,8`` (a list), ``16..512`` (powers of two from 16 up to 512, both ends kept), or a mix of both."""
    values: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        low, dots, high = part.partition("..")
        try:
            bounds = [int(low)] + ([int(high)] if dots else [])
        except ValueError:
            raise InvalidOptionError(f"{option} {text!r}: whole numbers separated by commas, or a range "
                                     "LOW..HIGH (e.g. 1,8 or 16..512)") from None
        if any(not 1 <= b <= MAX_DIMENSION for b in bounds):
            raise InvalidOptionError(f"{option} {text!r}: every size must be from 1 to {MAX_DIMENSION}")
        if dots:
            low_value, high_value = bounds
            if low_value > high_value:
                raise InvalidOptionError(f"{option} {text!r}: a range runs from low to high")
            values.update(_powers_of_two_between(low_value, high_value))
        else:
            values.add(bounds[0])
    return sorted(values)


def _powers_of_two_between(low: int, high: int) -> list[int]:
    sizes, power = [low], 1
    while power < high:
        if power > low:
            sizes.append(power)
        power *= 2
    return sizes + [high]


def read_lengths_file(path: str | os.PathLike) -> dict[int, int]:
    """Length -> number of requests, from one length per line or ``LENGTH COUNT`` lines ('#' comments)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidOptionError(f"--lengths-file {path}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise InvalidOptionError(f"--lengths-file {path}: not a file")
    if size > MAX_LENGTHS_FILE_BYTES:
        raise InvalidOptionError(f"--lengths-file {path}: {size} bytes; a length file is at most "
                                 f"{MAX_LENGTHS_FILE_BYTES} bytes (give a histogram: LENGTH COUNT per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptionError(f"--lengths-file {path}: not a text file ({exc})") from exc
    counts: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            values = [int(f) for f in fields]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or any(v < 1 for v in values) or values[0] > MAX_DIMENSION:
            raise InvalidOptionError(f"--lengths-file {path}, line {number}: {line.strip()[:60]!r} is not a "
                                     "length (1 or more) or LENGTH COUNT")
        counts[values[0]] = counts.get(values[0], 0) + (values[1] if len(values) == 2 else 1)
    if not counts:
        raise InvalidOptionError(f"--lengths-file {path}: no lengths in it")
    return counts


def grid(batches: list[int], seqs: list[int]) -> Workload:
    """Every (batch, seq) combination, dense and equally weighted."""
    scenarios = tuple(Scenario(b, s) for b in batches for s in seqs)
    _check_count(scenarios)
    return Workload(scenarios=scenarios)


def from_distribution(counts: dict[int, int], batches: list[int], seq: int, *, seed: int = 0) -> Workload:
    """Seeded batches of requests drawn from ``counts``, each padded to ``seq``.

    The traced batch's lengths (what the padding passes specialise to) are the
    first draw at the first batch size.
    """
    too_long = [n for n in counts if n > seq]
    if too_long:
        raise InvalidOptionError(f"--lengths-file: {max(too_long)} is longer than --seq {seq}; raise --seq or "
                                 "drop the longer requests")
    lengths, weights = zip(*sorted(counts.items()))
    draw = random.Random(seed)
    scenarios = tuple(Scenario(b, seq, tuple(draw.choices(lengths, weights, k=b)))
                      for b in batches for _ in range(BATCHES_PER_BATCH_SIZE))
    _check_count(scenarios)
    return Workload(lengths=scenarios[0].lengths, scenarios=scenarios)


def _check_count(scenarios: tuple[Scenario, ...]) -> None:
    if len(scenarios) > MAX_SCENARIOS:
        raise InvalidOptionError(f"the workload has {len(scenarios)} batch shapes; at most {MAX_SCENARIOS} "
                                 "(fewer batch sizes or a narrower --seq range)")
