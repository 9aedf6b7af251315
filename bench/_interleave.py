"""Interleaved A/B(/C…) timing: the only honest way to compare on a noisy machine.

Two benchmarks run minutes apart compare the machine's mood as much as the code.
Here every candidate runs in short rounds, one after the other (A, B, C, then
B, C, A, …: the starting candidate rotates so that none always runs first), and
a ratio is the median of the per-round ratios: a burst of noise slows one round
of every candidate alike, and the median discards the rounds it did not.

    from bench._interleave import interleave

    result = interleave({"meterkit": check_a, "limits": check_b}, rounds=15)
    print(result.table())
    print(result.ratio_line("limits", "meterkit"))

Candidates are zero-argument callables; whatever they return is discarded. The
loop that calls them costs the same for every candidate (a few tens of ns), and
it is not subtracted: the ratios are slightly conservative.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Interleaved", "calibrate", "interleave", "time_ops"]

Candidate = Callable[[], object]


def time_ops(fn: Candidate, ops: int) -> float:
    """Seconds taken by ``ops`` calls of ``fn``."""
    repeat = itertools.repeat
    clock = time.perf_counter
    start = clock()
    for _ in repeat(None, ops):
        fn()
    return clock() - start


def calibrate(fn: Candidate, seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds`` (at least 1)."""
    ops = 1
    while True:
        took = time_ops(fn, ops)
        if took >= seconds / 5 or ops >= 1 << 30:
            break
        ops *= 4
    # The fastest of three: a one-off stall (a collection, a sweep) must not shrink rounds.
    took = min(took, time_ops(fn, ops), time_ops(fn, ops))
    return max(1, round(ops * seconds / max(took, 1e-9)))


@dataclass
class Interleaved:
    """Per-round timings of interleaved candidates, and what follows from them."""

    names: tuple[str, ...]
    ops: dict[str, int]
    """Calls per round, per candidate (calibrated so that each round lasts about as long)."""
    us_per_op: dict[str, list[float]] = field(default_factory=dict)
    """Microseconds per call, one entry per round."""

    @property
    def rounds(self) -> int:
        return len(self.us_per_op[self.names[0]])

    def median_us(self, name: str) -> float:
        """The median of ``name``'s per-round µs/op."""
        return statistics.median(self.us_per_op[name])

    def ratios(self, slow: str, fast: str) -> list[float]:
        """``slow``'s time over ``fast``'s, round by round."""
        return [s / f for s, f in zip(self.us_per_op[slow], self.us_per_op[fast], strict=True)]

    def ratio(self, slow: str, fast: str) -> float:
        """The median of the per-round ratios ``slow / fast`` (> 1: ``fast`` is faster)."""
        return statistics.median(self.ratios(slow, fast))

    def ratio_line(self, slow: str, fast: str, label: str | None = None) -> str:
        """One line for logs, e.g. ``RATIO meterkit/limits: 9.3x faster (median of 15 rounds)``."""
        label = label or f"{fast}/{slow}"
        r = self.ratio(slow, fast)
        spread = sorted(self.ratios(slow, fast))
        return (
            f"RATIO {label}: {r:.2f}x faster (median of {self.rounds} rounds; "
            f"range {spread[0]:.2f}-{spread[-1]:.2f})"
        )

    def table(self) -> str:
        """Per-candidate median µs/op and per-round figures, one candidate a line."""
        width = max(len(n) for n in self.names)
        lines = []
        for name in self.names:
            rounds = " ".join(f"{v:.2f}" for v in self.us_per_op[name])
            lines.append(
                f"  {name:<{width}}  median {self.median_us(name):8.3f} µs/op"
                f"  ({self.ops[name]} ops/round)  rounds: {rounds}"
            )
        return "\n".join(lines)


def interleave(
    candidates: Mapping[str, Candidate],
    *,
    rounds: int = 15,
    round_seconds: float = 0.05,
    warmup_rounds: int = 1,
    collect: bool = True,
    before_round: Mapping[str, Callable[[], object]] | None = None,
) -> Interleaved:
    """Run ``candidates`` in interleaved rounds of about ``round_seconds`` each.

    Each candidate is calibrated first (so a round of each lasts about as long),
    then ``warmup_rounds`` untimed rounds run, then ``rounds`` timed ones. With
    ``collect`` a full garbage collection runs before each round (outside the
    timing) so that no candidate inherits another's garbage; the collector stays
    enabled inside the rounds, as it is in a server. ``before_round[name]``, when
    given, runs before each of that candidate's rounds, untimed (to give it fresh
    state, say).
    """
    if not candidates:
        raise ValueError("nothing to compare")
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    names = tuple(candidates)
    ops = {name: calibrate(candidates[name], round_seconds) for name in names}
    result = Interleaved(names, ops, {name: [] for name in names})
    for r in range(-warmup_rounds, rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before_round is not None and name in before_round:
                before_round[name]()
            if collect:
                gc.collect()
            took = time_ops(candidates[name], ops[name])
            if r >= 0:
                result.us_per_op[name].append(took / ops[name] * 1e6)
    return result
