"""Loader samples/s from a local HTTP server over the same shards read from the directory (goal >= 0.8).

Side by side in one run, on the same shards (tinyshakespeare, char, seq_len 64, or ``--data``):
the trainer's ``TrainLoader`` (global order, 12 streams, sha256 checks, collation; batch 12,
``num_workers=0``) reading ``data.dir=DIR`` and ``data.dir=http://127.0.0.1:PORT/…`` served by
``python -m http.server`` in another process, without a disk cache (every shard crosses the socket;
``data.prefetch=1``), then with a warm ``data.cache_dir``. Runs alternate, the median of each is kept.

    python benchmarks/remote.py [--batches 3000] [--repeats 3] [--data DIR]

The last line is the ratio HTTP (no cache) / local.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import prepared_shards  # noqa: E402
from data.remote import RemoteOptions  # noqa: E402
from data.shards import load_manifest  # noqa: E402
from data.stream import Layout, TrainLoader  # noqa: E402

BATCH = 12


def loader_rate(location: str, batches: int, options: RemoteOptions) -> float:
    """Samples/s of the trainer's loader, manifest load and first batch included (the first
    shards' transfer is what a remote set adds)."""
    start = time.perf_counter()
    loader = TrainLoader(load_manifest(location, options), Layout(BATCH, BATCH), seed=1337, num_streams=12)
    for _ in range(batches):
        next(loader)
    return batches * BATCH / (time.perf_counter() - start)


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
    parser.add_argument("--batches", type=int, default=3000, help="micro-batches read per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data).resolve()
    server, base = serve(data.parent)
    url = f"{base}/{data.name}"
    cache = RemoteOptions(cache_dir=tempfile.mkdtemp(prefix="bench-cache-"))
    runs: dict[str, list[float]] = {"local": [], "http": [], "http+cache": []}
    try:
        loader_rate(url, args.batches, cache)  # fills the cache; also warms the page cache and imports
        for _ in range(args.repeats):
            runs["local"].append(loader_rate(str(data), args.batches, RemoteOptions()))
            runs["http"].append(loader_rate(url, args.batches, RemoteOptions()))
            runs["http+cache"].append(loader_rate(url, args.batches, cache))
    finally:
        server.terminate()
        server.wait()
    rate = {name: statistics.median(values) for name, values in runs.items()}
    for name, value in rate.items():
        spread = ", ".join(f"{v:,.0f}" for v in runs[name])
        print(f"{name:>10}: {value:,.0f} samples/s (runs: {spread})")
    print(f"ratio http+cache / local: {rate['http+cache'] / rate['local']:.3f}")
    print(f"ratio http / local: {rate['http'] / rate['local']:.3f}")


if __name__ == "__main__":
    main()
