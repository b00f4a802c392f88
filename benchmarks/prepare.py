"""gpt-prepare at scale: MB/s over the tokenizer's own ceiling (goal >= 0.7), and peak memory at
4x the input (growth goal <= 10%).

Side by side in one run, on a synthetic corpus written to a temp dir: the lines of
tinyshakespeare and rotten_tomatoes, shuffled, in documents of 10-60 lines, as ``.jsonl`` files
of ~25 MB (shuffled so that BPE meets many distinct words and merges). A byte-level BPE
(``vocab_size`` 8192) is trained once with gpt-prepare's own trainer on a 20 MB sample and
passed as ``tokenizer=file:`` so that both sides tokenize the same way and the ratio is about
tokenizing, not training (the training time is printed apart).

- ceiling: ``tokenizers``' ``encode_batch`` of the same documents, already in memory (no I/O,
  no JSON, no shards), in batches of 1,000 with its own thread pool on the same cores;
- gpt-prepare: ``python -m data.prepare ... workers=2 seq_len=1024`` end to end (start-up, reading,
  tokenizing, part files, shards, manifest), input MB / wall seconds;
- memory: the peak of the summed RSS of gpt-prepare's process tree (sampled every 50 ms), on
  ``--mb`` MB and on ``--scale`` times as much.

Ceiling and gpt-prepare alternate for ``--rounds`` rounds and the best of each is kept; the MB per
CPU second of both (``getrusage`` of the process trees) is printed too, a figure that another
load on the machine disturbs less than MB/s.

    nice python benchmarks/prepare.py [--mb 200] [--scale 4] [--workers 2] [--rounds 2]

The last line is the worse of the two against its goal.

``--executor ray``: ``executor=ray`` over ``executor=local`` at the same ``workers``, alternated
rounds, best of each (goal >= 0.8), twice: with the local Ray of ``--workers`` CPUs that the command
starts (its start counted in its time; the start alone is timed and printed), and on a Ray head
started before (``executor.address=``, as on a cluster); and the peak RSS of one Ray worker at
``--mb`` and at ``--scale`` times as much (growth goal <= 10%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, TINYSHAKESPEARE  # noqa: E402

ROTTEN = REPO.parent / "shared" / "data"
FILE_MB = 25
CEILING = r"""
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(line)["text"] for path in sys.argv[2:] for line in open(path, encoding="utf-8")]
size = sum(len(d.encode("utf-8")) for d in docs)
start, cpu = time.perf_counter(), time.process_time()
for i in range(0, len(docs), 1000):
    tok.encode_batch(docs[i : i + 1000], add_special_tokens=False)
print(json.dumps({"bytes": size, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""


def line_pool() -> list[str]:
    lines = [line for line in TINYSHAKESPEARE.read_text().split("\n") if line.strip()]
    for name in ("rotten_tomatoes.train.jsonl", "rotten_tomatoes.validation.jsonl"):
        with open(ROTTEN / name, encoding="utf-8") as f:
            lines += [json.loads(line)["text"] for line in f if line.strip()]
    return lines


def write_corpus(directory: Path, megabytes: int, seed: int, pool: list[str]) -> int:
    """``megabytes`` of .jsonl documents of shuffled lines; returns the bytes written."""
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    written, number = 0, 0
    while written < megabytes * 1e6:
        path = directory / f"part-{number:04d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < FILE_MB * 1e6 and written + f.tell() < megabytes * 1e6:
                f.write(json.dumps({"text": "\n".join(rng.choices(pool, k=rng.randint(10, 60)))}) + "\n")
        written += path.stat().st_size
        number += 1
    return written


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def ceiling(tokenizer: Path, files: list[Path], threads: int) -> tuple[float, float]:
    """(MB/s, MB per CPU second) of ``encode_batch`` on ``threads`` threads, the text in memory."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", CEILING, str(tokenizer), *map(str, files)]
    result = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    return result["bytes"] / result["seconds"] / 1e6, result["bytes"] / result["cpu"] / 1e6


def worker_rss(pid: int) -> int:
    """The largest RSS of one worker process under ``pid``: a pool process, or a Ray worker (titled
    ``ray::TASK`` or ``ray::IDLE``; Ray's own agents, GCS and raylet are not workers)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    largest = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            title = (proc.cmdline() or [""])[0]
            ray_worker = title.startswith("ray::") and not title.endswith("Agent")
            if ray_worker or (title == sys.executable and proc.ppid() == pid):
                largest = max(largest, proc.memory_info().rss)
    return largest


def run_prepare(
    corpus: Path, out: Path, tokenizer: Path, workers: int, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[float, int, float, int]:
    """(wall seconds, peak RSS of the process tree, CPU seconds of the tree, peak RSS of one worker)
    of one gpt-prepare run."""
    cmd = [sys.executable, "-m", "data.prepare", f"input={corpus}", f"out={out}", f"tokenizer=file:{tokenizer}"]
    cmd += [f"workers={workers}", "seq_len=1024", *overrides]
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, worker_peak, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            worker_peak[0] = max(worker_peak[0], worker_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"gpt-prepare failed:\n{output}")
    return seconds, peak[0], children_cpu() - cpu, worker_peak[0]


def ray_start_seconds(workers: int) -> float:
    """Wall seconds of starting and stopping a local Ray of ``workers`` CPUs (what executor=ray adds)."""
    code = (
        "import logging, time, ray; t = time.perf_counter(); "
        f"ray.init(address='local', num_cpus={workers}, include_dashboard=False, logging_level=logging.WARNING); "
        "ray.shutdown(); print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def running_ray(workers: int) -> Iterator[str]:
    """A Ray head of ``workers`` CPUs started apart (as on a cluster, before the job); its address.
    Stopped by ending its own ``ray start --block`` (``ray stop`` would stop every Ray of the machine)."""
    import socket

    from ray._private.services import get_node_ip_address  # the address Ray's GCS listens on

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{get_node_ip_address()}:{port}"
    ray = Path(sys.executable).with_name("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # a started head checks its token: the drivers must send it
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={workers}",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ready = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); ray.shutdown()"
    try:
        for _ in range(20):
            with contextlib.suppress(subprocess.TimeoutExpired):
                check = subprocess.run([sys.executable, "-c", ready, address], capture_output=True, timeout=60)
                if check.returncode == 0:
                    break
            time.sleep(2)
        else:
            sys.exit(f"benchmark: the Ray head at {address} did not come up")
        yield address
    finally:
        head.terminate()
        head.wait(timeout=120)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def compare_ray(args: argparse.Namespace, root: Path, tokenizer: Path, small: int, large: int) -> None:
    """executor=ray (a Ray started by the command, and a running one) over executor=local, alternated
    rounds, best of each; one Ray worker's peak RSS at 1x and at ``--scale`` x."""
    print(f"a local Ray of {args.workers} CPUs starts and stops in {ray_start_seconds(args.workers):.1f} s", flush=True)
    rates: dict[str, list[float]] = {}
    worker_small = 0
    with running_ray(args.workers) as address:
        running = ["executor=ray", f"executor.address={address}"]
        sides = {"local": ["executor=local"], "ray": ["executor=ray"], "ray, running": running}
        for round_ in range(args.rounds):
            for side, overrides in sides.items() if round_ % 2 == 0 else reversed(sides.items()):
                out = root / f"out-{round_}"
                seconds, _, _, worker = run_prepare(root / "small", out, tokenizer, args.workers, overrides)
                shutil.rmtree(out)
                rates.setdefault(side, []).append(small / seconds / 1e6)
                worker_small = max(worker_small, worker) if side == "ray" else worker_small
                print(
                    f"round {round_ + 1}: {side} (workers={args.workers}) {rates[side][-1]:.2f} MB/s ({seconds:.1f} s)"
                    + (f", peak RSS of one worker {worker / 2**20:.0f} MiB" if side != "ray, running" else ""),
                    flush=True,
                )
    seconds, _, _, worker_large = run_prepare(
        root / "large", root / "out-large", tokenizer, args.workers, ["executor=ray"]
    )
    print(
        f"executor=ray on {large / 1e6:.0f} MB: {large / seconds / 1e6:.2f} MB/s ({seconds:.1f} s), peak RSS of "
        f"one worker {worker_large / 2**20:.0f} MiB (on {small / 1e6:.0f} MB: {worker_small / 2**20:.0f} MiB)",
        flush=True,
    )
    growth = worker_large / worker_small - 1
    lines = [(1.10 / (1 + growth), f"peak RSS of one Ray worker at {args.scale}x = {100 * growth:+.1f}% (goal <= 10%)")]
    for side in ("ray", "ray, running"):
        ratio = max(rates[side]) / max(rates["local"])
        lines.append((ratio / 0.8, f"{side} MB/s / local (best of {args.rounds}) = {ratio:.3f} (goal >= 0.8)"))
    for _, line in sorted(lines, reverse=True):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="ray: ray over local")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    pool = line_pool()
    small = write_corpus(root / "small", args.mb, 0, pool)
    large = write_corpus(root / "large", args.mb * args.scale, 1, pool)
    print(f"corpus: {small / 1e6:.0f} MB and {large / 1e6:.0f} MB of .jsonl in {root}", flush=True)

    from data.corpus import sample_texts
    from data.tokenizer import BPETokenizer

    files = sorted((root / "small").glob("*.jsonl"))
    start = time.perf_counter()
    BPETokenizer.train(sample_texts(files, "text", 20_000_000), 8192).save(root)
    print(f"bpe training (vocab 8192, 20 MB sample): {time.perf_counter() - start:.1f} s", flush=True)
    tokenizer = root / "tokenizer.json"
    if args.executor == "ray":
        compare_ray(args, root, tokenizer, small, large)
        shutil.rmtree(root, ignore_errors=True)
        return

    # alternated rounds, best of each side: a machine shared with others weighs on both alike
    ceilings, rates, cpu_ratios, peak_small = [], [], [], 0
    for round_ in range(args.rounds):
        ceiling_rate, ceiling_cpu = ceiling(tokenizer, files, args.workers)
        out = root / f"out-small-{round_}"
        seconds, peak, cpu, _ = run_prepare(root / "small", out, tokenizer, args.workers)
        shutil.rmtree(out)
        rate, peak_small = small / seconds / 1e6, max(peak_small, peak)
        ceilings.append(ceiling_rate)
        rates.append(rate)
        cpu_ratios.append(small / cpu / 1e6 / ceiling_cpu)
        print(
            f"round {round_ + 1}: ceiling (encode_batch, {args.workers} threads, no I/O) {ceiling_rate:.2f} MB/s, "
            f"gpt-prepare workers={args.workers} {rate:.2f} MB/s ({seconds:.1f} s), peak RSS {peak / 2**20:.0f} MiB, "
            f"MB per CPU second (whole process tree) over the ceiling's {cpu_ratios[-1]:.3f}",
            flush=True,
        )
    rate, ceiling_rate = max(rates), max(ceilings)
    seconds_large, peak_large, _, _ = run_prepare(root / "large", root / "out-large", tokenizer, args.workers)
    print(
        f"gpt-prepare on {large / 1e6:.0f} MB: {large / seconds_large / 1e6:.2f} MB/s ({seconds_large:.1f} s), "
        f"peak RSS {peak_large / 2**20:.0f} MiB (on {small / 1e6:.0f} MB: {peak_small / 2**20:.0f} MiB)",
        flush=True,
    )
    ratio = rate / ceiling_rate
    growth = peak_large / peak_small - 1
    lines = [
        (ratio / 0.7, f"gpt-prepare MB/s / encode_batch ceiling (best of {args.rounds}) = {ratio:.3f} (goal >= 0.7)"),
        (1.10 / (1 + growth), f"peak RSS growth at {args.scale}x the input = {100 * growth:+.1f}% (goal <= 10%)"),
    ]
    for _, line in sorted(lines, reverse=True):
        print(line)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
