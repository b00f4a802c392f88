"""Loader samples/s from a local HTTP server over the same shards read from the directory (goal >= 0.8).

Side by side in one run, on the same shards (``--data``, else tinyshakespeare six times over, char,
seq_len 64: 82 train shards of 1 MB, ~7 per stream, so that shard reads happen mid-epoch as in any
corpus of many shards, not only when an epoch opens every stream): the trainer's ``TrainLoader``
(global order, 12 streams, sha256 checks, collation; batch 12, ``num_workers=0``) reading
``data.dir=DIR`` and ``data.dir=http://127.0.0.1:PORT/…`` served by ``python -m http.server`` in
another process, without a disk cache (every shard crosses the socket; ``data.prefetch=1``), then
with a warm ``data.cache_dir``. Each round runs the three back to back; the ratios are the medians of
the rounds' ratios (a shared machine's load changes between rounds more than within one). Also the
loader process's CPU time per sample (all its threads).

    python benchmarks/remote.py [--batches 5000] [--rounds 9] [--data DIR]

The last line is the ratio HTTP (no cache) / local.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, TINYSHAKESPEARE  # noqa: E402
from data.remote import RemoteOptions  # noqa: E402
from data.shards import load_manifest  # noqa: E402
from data.stream import Layout, TrainLoader  # noqa: E402

BATCH = 12


def loader_rate(location: str, batches: int, options: RemoteOptions) -> tuple[float, float]:
    """Samples/s of the trainer's loader and its process's CPU microseconds per sample, manifest
    load and first batch included (the first shards' transfer is what a remote set adds)."""
    before, start = _cpu(), time.perf_counter()
    loader = TrainLoader(load_manifest(location, options), Layout(BATCH, BATCH), seed=1337, num_streams=12)
    for _ in range(batches):
        next(loader)
    seconds, cpu = time.perf_counter() - start, _cpu() - before
    return batches * BATCH / seconds, cpu / (batches * BATCH) * 1e6


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def corpus(data: str | None) -> Path:
    """``--data``, else tinyshakespeare x 6 prepared with gpt-prepare (char, seq_len 64)."""
    if data:
        return Path(data).resolve()
    root = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    (root / "text.txt").write_text(TINYSHAKESPEARE.read_text() * 6)
    args = [f"input={root / 'text.txt'}", f"out={root / 'ts6'}", "tokenizer=char", "seq_len=64"]
    subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, check=True, capture_output=True)
    return root / "ts6"


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on a free port of 127.0.0.1, serving ``root``, once it accepts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    server.kill()
    sys.exit("benchmark: the local HTTP server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5000, help="micro-batches read per measurement")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = corpus(args.data)
    server, base = serve(data.parent)
    url = f"{base}/{data.name}"
    cache = RemoteOptions(cache_dir=tempfile.mkdtemp(prefix="bench-cache-"))
    ways = {"local": (str(data), RemoteOptions()), "http": (url, RemoteOptions()), "http+cache": (url, cache)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        loader_rate(url, args.batches, cache)  # fills the cache; also warms the page cache and imports
        for _ in range(args.rounds):
            for name, (location, options) in ways.items():
                runs[name].append(loader_rate(location, args.batches, options))
    finally:
        server.terminate()
        server.wait()
    local = [rate for rate, _ in runs["local"]]
    for name, values in runs.items():
        rate, cpu = (statistics.median(v) for v in zip(*values, strict=True))
        print(f"{name:>10}: {rate:,.0f} samples/s, {cpu:.2f} CPU us/sample (median of {args.rounds} rounds)")
    for name in ("http+cache", "http"):
        ratios = [rate / base_rate for (rate, _), base_rate in zip(runs[name], local, strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"ratio {name} / local: {statistics.median(ratios):.3f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
