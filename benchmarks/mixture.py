"""Mixture loader samples/s with 3 sources over one source (goal >= 0.9), and the realised proportions.

Side by side in one run, on tinyshakespeare (char, seq_len 64): one source is ``data.dir``'s
``TrainLoader`` over the whole text; the mixture is ``data.sources``' ``MixtureLoader`` over its
three thirds (prepared with the same tokenizer) at weights 0.5 / 0.3 / 0.2, and over the whole
text as a one-source mixture. Each loader reads ``--batches`` micro-batches of 12 (one rank, no
workers) after its first; rounds alternate and the median counts. The proportion error is
``max |samples_i(n) - w_i·n|`` over every prefix ``n`` of the measured positions, and at step ends.

    python benchmarks/mixture.py [--batches 3000] [--rounds 3]

The last line is the ratio 3 sources / one source.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, TINYSHAKESPEARE  # noqa: E402
from data.mixture import MixtureLoader, Source  # noqa: E402
from data.shards import load_manifest  # noqa: E402
from data.stream import Layout, TrainLoader  # noqa: E402

BATCH, K, SEED = 12, 12, 1337
WEIGHTS = (0.5, 0.3, 0.2)


def prepare(text: Path, out: Path, tokenizer: str) -> Path:
    args = [f"input={text}", f"out={out}", f"tokenizer={tokenizer}", "seq_len=64"]
    subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, check=True, capture_output=True)
    return out


def rate(loader: object, batches: int) -> float:
    next(loader)  # type: ignore[call-overload]
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)  # type: ignore[call-overload]
    return batches * BATCH / (time.perf_counter() - start)


def proportion_error(loader: MixtureLoader, positions: int) -> tuple[float, float]:
    """Worst |samples_i(n) - w_i n| over every prefix n, and over step ends only (in samples)."""
    source, _ = loader.order.locate(np.arange(positions))
    counts = np.cumsum(source[:, None] == np.arange(len(WEIGHTS))[None, :], axis=0)
    ideal = np.arange(1, positions + 1)[:, None] * np.asarray(WEIGHTS)[None, :]
    error = np.abs(counts - ideal)
    return float(error.max()), float(error[BATCH - 1 :: BATCH].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000, help="micro-batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mixture-"))
    whole = prepare(TINYSHAKESPEARE, work / "whole", "char")
    text = TINYSHAKESPEARE.read_text()
    thirds = []
    for i in range(3):
        part = work / f"part{i}.txt"
        part.write_text(text[i * len(text) // 3 : (i + 1) * len(text) // 3])
        thirds.append(prepare(part, work / f"part{i}", f"file:{whole / 'tokenizer.json'}"))
    layout = Layout(BATCH, BATCH)
    one = load_manifest(whole)
    three = [Source(f"part{i}", load_manifest(d), w) for i, (d, w) in enumerate(zip(thirds, WEIGHTS, strict=True))]
    makers = {
        "one source (data.dir, TrainLoader)": lambda: TrainLoader(one, layout, SEED, K),
        "one-source mixture (data.sources)": lambda: MixtureLoader([Source("whole", one, 1.0)], layout, SEED, K),
        "3 sources 0.5/0.3/0.2 (data.sources)": lambda: MixtureLoader(three, layout, SEED, K),
    }
    rates: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, make in makers.items():
            rates[name].append(rate(make(), args.batches))
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in median.items():
        rounds = " / ".join(f"{v:,.0f}" for v in rates[name])
        print(f"{name}: {value:,.0f} samples/s (rounds {rounds})")
    worst, at_steps = proportion_error(MixtureLoader(three, layout, SEED, K), (args.batches + 1) * BATCH)
    print(
        f"realised proportions over {(args.batches + 1) * BATCH:,} positions: worst |samples_i(n) - w_i n| = "
        f"{worst:.2f} samples at any n, {at_steps:.2f} at step ends (bound: < num_streams = {K})"
    )
    base = median["one source (data.dir, TrainLoader)"]
    print(f"ratio one-source mixture / one source: {median['one-source mixture (data.sources)'] / base:.3f}")
    print(f"ratio 3 sources / one source: {median['3 sources 0.5/0.3/0.2 (data.sources)'] / base:.3f}")


if __name__ == "__main__":
    main()
