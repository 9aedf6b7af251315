"""Draw the plots of docs/algorithms.md with the simulator.

    python docs/plots.py [OUTPUT_DIR]     # default: docs/img

Every algorithm gets the same traffic from one key, against a tier of 20 per
minute: a 20-second burst at 2 requests/second that straddles a minute boundary
(t = 50 s to 70 s), a pause, then a steady 1 request/second from t = 120 s. The
upper panel shows requests arriving and admitted per second; the lower one the
requests admitted in the trailing 60 seconds, against the limit, which is what
each algorithm's promise is about. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

from meterkit import Category, CostTable, CreditPlan, Operation, Policy, Tier
from meterkit.simulate import simulate

LIMIT = 20
WINDOW = 60
START = 1_767_225_600  # 2026-01-01T00:00:00Z: minute boundaries fall on multiples of 60 s
SPAN = 300
PROMISES = {
    "fixed_window": "≤ 20 per aligned minute; up to 2 × 20 across a boundary",
    "sliding_window": "≤ 20 per aligned minute, weighted estimate ≤ 20",
    "gcra": "≤ burst + d / 3 s over any interval d (burst 20)",
    "sliding_log": "≤ 20 in every rolling minute, exactly",
}


def traffic() -> list[tuple[float, str, str, str]]:
    """The trace every algorithm replays (see the module docstring)."""
    burst = [START + 50 + i * 0.5 for i in range(40)]
    steady = [START + 120 + i for i in range(SPAN - 120)]
    return [(t, "key_demo", "org_demo", "items.list") for t in burst + steady]


def policy_for(algorithm: str) -> Policy:
    """A one-tier policy: 20 per minute per key, with the given algorithm."""
    return Policy(
        [Tier("limit", "key", f"{LIMIT}/minute", algorithm)],  # type: ignore[arg-type]
        CostTable((Category("read", "0.01", "0.01"),), (Operation("items.list", "read", "0.01"),)),
        CreditPlan("1000"),
        name=algorithm,
    )


def trailing(per_second: list[int], width: int = WINDOW) -> list[int]:
    """For each second s, the sum of the counts of seconds s-width+1 .. s."""
    out, running = [], 0
    for i, n in enumerate(per_second):
        running += n
        if i >= width:
            running -= per_second[i - width]
        out.append(running)
    return out


def draw(algorithm: str, out_dir: Path) -> Path:
    """Replay the traffic through one algorithm and save its plot; return the file."""
    from matplotlib.figure import Figure

    rows = traffic()
    report = simulate(rows, policy_for(algorithm), timeline=True)
    assert report.timeline is not None
    seconds = range(SPAN)
    arrived = [0] * SPAN
    for t, *_ in rows:
        arrived[int(t) - START] += 1
    admitted_by_second = report.timeline.admitted["limit"]
    admitted = [admitted_by_second.get(START + s, 0) for s in seconds]

    fig = Figure(figsize=(8, 3.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.3))
    top.bar(seconds, arrived, width=1.0, color="#ced4da", label="arriving")
    top.bar(seconds, admitted, width=1.0, color="#2b8a3e", label="admitted")
    top.set_ylabel("per second", fontsize=8)
    top.legend(loc="upper right", fontsize=7, ncols=2)
    top.set_title(
        f"{algorithm}: {report.admitted} of {report.requests} admitted — {PROMISES[algorithm]}",
        loc="left",
        fontsize=9,
    )
    bottom.plot(seconds, trailing(admitted), color="#1864ab", label="admitted in the last 60 s")
    bottom.axhline(LIMIT, color="#c92a2a", linestyle="--", linewidth=1, label="limit (20)")
    for boundary in range(0, SPAN + 1, WINDOW):
        for ax in (top, bottom):
            ax.axvline(boundary, color="#868e96", linewidth=0.5, alpha=0.5)
    bottom.set_ylim(0, 2 * LIMIT + 4)
    bottom.set_ylabel("last 60 s", fontsize=8)
    bottom.set_xlabel("seconds (grey lines: minute boundaries)", fontsize=8)
    bottom.legend(loc="upper right", fontsize=7)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    path = out_dir / f"algorithm-{algorithm.replace('_', '-')}.png"
    fig.savefig(path, dpi=96)
    return path


def main(out_dir: Path) -> list[Path]:
    """Draw every algorithm's plot into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw(name, out_dir) for name in PROMISES]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "img"
    for written in main(target):
        print(f"{written} ({written.stat().st_size // 1024} KB)")
