"""Loader samples/s from a local HTTP or S3 server over the same shards read from the directory (goal >= 0.8).

Side by side in one run, on the same shards (``--data``, else tinyshakespeare six times over, char,
seq_len 64: 82 train shards of 1 MB, ~7 per stream, so that shard reads happen mid-epoch as in any
corpus of many shards, not only when an epoch opens every stream): the trainer's ``TrainLoader``
(global order, 12 streams, sha256 checks, collation; batch 12, ``num_workers=0``) reading
``data.dir=DIR`` and ``data.dir=http://127.0.0.1:PORT/…`` served by ``python -m http.server`` in
another process (``--scheme s3``: ``data.dir=s3://bench/…`` from moto's S3 server, ``python -m
moto.server``, in another process, found through ``AWS_ENDPOINT_URL`` as a user's store is), without
a disk cache (every shard crosses the socket; ``data.prefetch=1``), then with a warm
``data.cache_dir``. Each round runs the three back to back; the ratios are the medians of the rounds'
ratios (a shared machine's load changes between rounds more than within one). Also the loader
process's CPU time per sample (all its threads).

    python benchmarks/remote.py [--scheme http|s3] [--batches 5000] [--rounds 9] [--data DIR]

The last line is the ratio HTTP (or S3; no cache) / local.
"""

from __future__ import annotations

import argparse
import os
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


def _started(cmd: list[str], port: int, what: str) -> subprocess.Popen:
    """``cmd`` in another process, once it accepts connections on ``port``."""
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    sys.exit(f"benchmark: the local {what} server did not start")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on a free port of 127.0.0.1, serving ``root``, once it accepts."""
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    return _started(cmd, port, "HTTP"), f"http://127.0.0.1:{port}"


def serve_s3(data: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in another process, the shard set uploaded to ``s3://bench/<name>``, and this
    process's AWS environment pointed at it; returns the server and the shard set's URL."""
    port = _free_port()
    server = _started([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "S3")
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    os.environ.pop("AWS_PROFILE", None)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for path in sorted(data.iterdir()):
        if path.is_file():
            client.put_object(Bucket="bench", Key=f"{data.name}/{path.name}", Body=path.read_bytes())
    return server, f"s3://bench/{data.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5000, help="micro-batches read per measurement")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--data", default=None)
    parser.add_argument("--scheme", choices=("http", "s3"), default="http", help="the remote side's protocol")
    args = parser.parse_args()
    data = corpus(args.data)
    if args.scheme == "s3":
        server, url = serve_s3(data)
    else:
        server, base = serve(data.parent)
        url = f"{base}/{data.name}"
    cache = RemoteOptions(cache_dir=tempfile.mkdtemp(prefix="bench-cache-"))
    remote, cached = args.scheme, f"{args.scheme}+cache"
    ways = {"local": (str(data), RemoteOptions()), remote: (url, RemoteOptions()), cached: (url, cache)}
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
    for name in (cached, remote):
        ratios = [rate / base_rate for (rate, _), base_rate in zip(runs[name], local, strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"ratio {name} / local: {statistics.median(ratios):.3f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
