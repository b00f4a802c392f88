"""Checkpoint checksums: what hashing costs a save, and what verifying costs a load.

Checkpoints carry xxh3 checksums (``parallel/checksums.py``): megatron-core's ``.distcp``
shard writers hash each file as they write it (a ``<file>.xxh3`` sidecar), the commit folds
the sidecars into ``checksums.json``, and a resume verifies every file before loading it.
The issue's goals, for ``model=gpt2-small`` on the CPU:

- **save**: ``CheckpointDir.save`` with checksums over the same save without them, <= 1.05;
- **verify**: ``checksums.verify(step_dir)`` over the engine's load of that step
  (``CheckpointDir.load``), <= 0.25.

One process builds the megatron-core engine as ``gpt-pretrain`` does (single process, tp=1,
the GPT-2 vocabulary by default: 124M parameters, so a step is ~1.5 GB of weights and Adam
moments) and runs one training step on synthetic tokens so the optimizer state exists; no
data set is needed. Then, side by side:

- saves alternate between the two arms (ABBA order over ``--repeats`` rounds, after one
  untimed warm-up save of each, which builds megatron's cached save plan), each into a fresh
  run dir that is removed after timing. "None" is the same save with
  ``checksums.hash_megatron_writes`` and ``checksums.write_manifest`` patched to no-ops and
  megatron's shard writer given the builtin ``open`` back; both arms write through megatron's
  writer processes, which fsync every shard the same way;
- verify and load alternate on one saved step (after one untimed warm-up load), with the
  files in the page cache (they were just written), which is the case least favourable to
  verification (no disk time to hide behind). ``--cold`` adds one pair of timings with the
  step's pages evicted first (``posix_fadvise(DONTNEED)`` on its own files only).

The checksum arm is instrumented (not changed): the seconds each shard writer spends in
xxh3 (timed inside the forked writers), and at commit the files that arrive with a writer's
sidecar and the bytes ``write_manifest`` has to hash again from disk.

    OMP_NUM_THREADS=2 python benchmarks/checkpoint_verify.py [--model gpt2-small] [--repeats 3] [--dir TMPDIR]

The last line gives both ratios (medians over repeats) and whether each goal is met.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SAVE_GOAL = 1.05
VERIFY_GOAL = 0.25
GPT2_VOCAB = 50257


@contextlib.contextmanager
def checksums_off() -> Iterator[None]:
    """The save without checksums: no hashing writer, no manifest (restored on exit).

    ``hash_megatron_writes`` leaves megatron's module-level ``open`` patched after the first
    save, so a no-op alone would still hash; the builtin ``open`` is given back as well."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from parallel import checksums

    saved = checksums.hash_megatron_writes, checksums.write_manifest
    patched_open = filesystem_async.__dict__.pop("open", None)
    checksums.hash_megatron_writes = lambda: None
    checksums.write_manifest = lambda directory: {}
    try:
        yield
    finally:
        checksums.hash_megatron_writes, checksums.write_manifest = saved
        if patched_open is not None:
            filesystem_async.open = patched_open  # type: ignore[attr-defined]


class TimedHash:
    """An xxh3 state that adds up the seconds its ``update`` calls take."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def update(self, data: Any) -> None:
        start = time.perf_counter()
        self.inner.update(data)
        self.seconds += time.perf_counter() - start

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


class CommitProbe:
    """Instruments the checksum arm without changing what it writes: per save, the seconds
    each shard writer spent hashing (``HashingFile``'s digest timed in the forked writers,
    appended to ``log`` outside the step dir), and at commit the files that came with a
    sidecar and the bytes ``write_manifest`` had to hash again from disk."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from parallel import checksums

        write_manifest, file_digest = checksums.write_manifest, checksums.file_digest
        init, close = checksums.HashingFile.__init__, checksums.HashingFile.close
        log = self.log
        record: dict[str, Any] = {}

        def timed_init(hashing_file: Any, path: Any, raw: Any) -> None:
            init(hashing_file, path, raw)
            hashing_file._hash = TimedHash(hashing_file._hash)

        def timed_close(hashing_file: Any) -> None:
            was_open = not hashing_file._raw.closed
            close(hashing_file)
            if was_open:  # runs in the writer process: one line per shard
                with open(log, "a") as stream:
                    stream.write(f"{hashing_file._hash.seconds}\n")

        def digest(path: Any) -> str:
            record["rehashed_bytes"] = record.get("rehashed_bytes", 0) + os.path.getsize(path)
            record.setdefault("rehashed", []).append(Path(path).name)
            return file_digest(path)

        def manifest(directory: Path) -> Any:
            files = list(checksums._files(directory))
            hash_s = [float(line) for line in log.read_text().split()] if log.is_file() else []
            log.unlink(missing_ok=True)
            record.update(
                files=len(files),
                shards=sum(p.suffix == ".distcp" for p in files),
                shard_sidecars=sum(Path(str(p) + checksums.SIDECAR).is_file() for p in files if p.suffix == ".distcp"),
                writer_hash_s=max(hash_s, default=0.0),
                rehashed_bytes=0,
                rehashed=[],
            )
            start = time.perf_counter()
            result = write_manifest(directory)
            record["seconds"] = time.perf_counter() - start
            self.records.append(dict(record))
            return result

        checksums.write_manifest, checksums.file_digest = manifest, digest
        checksums.HashingFile.__init__, checksums.HashingFile.close = timed_init, timed_close
        try:
            yield
        finally:
            checksums.write_manifest, checksums.file_digest = write_manifest, file_digest
            checksums.HashingFile.__init__, checksums.HashingFile.close = init, close


def dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def evict(path: Path) -> None:
    """Drop this step's own pages from the page cache (clean pages only: fsync first)."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def xxh3_gbps(megabytes: int = 256) -> float:
    import xxhash

    buffer = os.urandom(megabytes << 20)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        xxhash.xxh3_64(buffer).hexdigest()
        best = min(best, time.perf_counter() - start)
    return len(buffer) / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", help="model preset (conf/model)")
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary size (default: GPT-2's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--dir", default=None, help="parent of the temp dir (default: the system temp dir)")
    parser.add_argument("--cold", action="store_true", help="also time verify and load with the pages evicted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from conf.cli import compose, quiet_third_party
    from parallel import checksums, cpu_compat
    from parallel.checkpoint import CheckpointDir
    from parallel.run_config import Run
    from parallel.topology import Topology
    from parallel.train_state import TrainState
    from pretrain.tasks.lm import build_engine

    quiet_third_party()
    cfg = compose([f"model={args.model}", "parallel.tp=1", "train.micro_batch=1", "train.global_batch=1"])
    run = Run.from_config(cfg)
    topo = run.layout
    cpu_compat.apply()
    topo.init(1337)
    engine = build_engine(run, args.vocab)
    params = sum(p.numel() for p in engine.unwrapped_model().parameters())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, 65), generator=generator)
    engine.train_step([{"tokens": tokens, "mask": torch.ones(1, 64)}])  # Adam moments exist from here on
    common = TrainState(step=1, config={}, vocab_size=args.vocab, task={"benchmark": "checkpoint_verify"})

    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt-verify-", dir=args.dir))
    probe = CommitProbe(root / "writer-hash-seconds.log")
    runs = 0

    def save(checksummed: bool, keep: bool = False) -> tuple[float, Path]:
        nonlocal runs
        runs += 1
        ckpts = CheckpointDir(root / f"run{runs}", keep_last=1)
        arm = probe.installed() if checksummed else checksums_off()
        with arm:
            start = time.perf_counter()
            step_dir = ckpts.save(1, engine, common)
            elapsed = time.perf_counter() - start
        ckpts.finalize(blocking=True)  # joins the pruner thread the commit started (nothing to prune)
        if not keep:
            shutil.rmtree(ckpts.root.parent)
        return elapsed, step_dir

    def verify(step_dir: Path) -> float:
        start = time.perf_counter()
        problems = checksums.verify(step_dir)
        elapsed = time.perf_counter() - start
        if problems is None or problems:
            sys.exit(f"benchmark: {step_dir} does not verify: {problems}")
        return elapsed

    def load(step_dir: Path) -> float:
        start = time.perf_counter()
        CheckpointDir(step_dir.parent.parent).load(step_dir, engine, restore_rng=False)
        return time.perf_counter() - start

    try:
        save(checksummed=True)  # warm-up of each arm: megatron builds and caches the save plan
        save(checksummed=False)
        probe.records.clear()
        with_s: list[float] = []
        none_s: list[float] = []
        for i in range(args.repeats):
            for checksummed in (True, False) if i % 2 == 0 else (False, True):
                (with_s if checksummed else none_s).append(save(checksummed)[0])
        _, step_dir = save(checksummed=True, keep=True)
        size, nfiles = dir_bytes(step_dir)
        largest_shard = max(p.stat().st_size for p in step_dir.glob("*.distcp"))

        load(step_dir)  # warm-up
        verify_s: list[float] = []
        load_s: list[float] = []
        for i in range(args.repeats):
            if i % 2 == 0:
                verify_s.append(verify(step_dir))
                load_s.append(load(step_dir))
            else:
                load_s.append(load(step_dir))
                verify_s.append(verify(step_dir))
        cold = None
        if args.cold:
            evict(step_dir)
            cold_verify = verify(step_dir)
            evict(step_dir)
            cold_load = load(step_dir)
            cold = cold_verify, cold_load
        hash_speed = xxh3_gbps()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        Topology.destroy()

    save_with, save_none = statistics.median(with_s), statistics.median(none_s)
    ver, lod = statistics.median(verify_s), statistics.median(load_s)
    save_ratio, verify_ratio = save_with / save_none, ver / lod
    rec = probe.records
    writers = int(cfg.train.checkpoint_writers)

    def runs_of(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(
        f"model={args.model}: {params / 1e6:.1f}M parameters (vocab {args.vocab}), one Adam step; "
        f"threads={args.threads}, checkpoint_writers={writers}"
    )
    print(f"checkpoint: {size / 1e6:.1f} MB in {nfiles} files ({rec[-1]['shards']} .distcp shards)")
    print("writes go through the page cache; megatron's writers fsync each shard in both arms alike")
    print()
    print(f"| {'':36} | {'median':>9} | runs |")
    print(f"|{'-' * 38}|{'-' * 11}|------|")
    print(f"| {'save, checksums':36} | {save_with:7.3f} s | {runs_of(with_s)} |")
    print(f"| {'save, none':36} | {save_none:7.3f} s | {runs_of(none_s)} |")
    writer_hash = [r["writer_hash_s"] for r in rec]
    label = "  of which hashing (slowest writer)"
    print(f"| {label:36} | {statistics.median(writer_hash):7.3f} s | {runs_of(writer_hash)} |")
    manifest = [r["seconds"] for r in rec]
    print(f"| {'  of which write_manifest (commit)':36} | {statistics.median(manifest):7.3f} s | {runs_of(manifest)} |")
    print(f"| {'verify (checksums.verify, cached)':36} | {ver:7.3f} s | {runs_of(verify_s)} |")
    print(f"| {'load (CheckpointDir.load, cached)':36} | {lod:7.3f} s | {runs_of(load_s)} |")
    if cold is not None:
        print(f"| {'verify, pages evicted':36} | {cold[0]:7.3f} s | 1 |")
        print(f"| {'load, pages evicted':36} | {cold[1]:7.3f} s | 1 |")
    print()
    print(
        f"hashing: verify reads and hashes {size / ver / 1e9:.2f} GB/s (page cache); "
        f"xxh3_64 in memory {hash_speed:.1f} GB/s"
    )
    shard_sidecars = [f"{r['shard_sidecars']}/{r['shards']}" for r in rec]
    rehashed = sorted({name for r in rec for name in r["rehashed"]})
    print(
        f"commit: .distcp shards with a writer's sidecar {', '.join(shard_sidecars)}; re-hashed at commit "
        f"{max(r['rehashed_bytes'] for r in rec) / 1e6:.2f} MB at most ({', '.join(rehashed) or 'none'})"
    )
    if cold is not None:
        print(
            f"pages evicted: verify / load {cold[0] / cold[1]:.3f} "
            f"(verify {size / cold[0] / 1e9:.2f} GB/s; what the eviction reaches depends on the storage)"
        )
    hash_s = largest_shard / (hash_speed * 1e9)
    print(
        f"cost of hashing: the slowest writer spent {statistics.median(writer_hash):.3f} s in xxh3 "
        f"({statistics.median(writer_hash) / save_none:.1%} of the save without; the writers run in parallel); "
        f"the largest shard ({largest_shard / 1e6:.0f} MB) at the in-memory speed: {hash_s:.3f} s"
    )
    save_ok = "met" if save_ratio <= SAVE_GOAL else "NOT met"
    verify_ok = "met" if verify_ratio <= VERIFY_GOAL else "NOT met"
    print(
        f"save ratio (checksums / none): {save_ratio:.3f} (goal <= {SAVE_GOAL}: {save_ok})   "
        f"verify / load: {verify_ratio:.3f} (goal <= {VERIFY_GOAL}: {verify_ok})"
    )


if __name__ == "__main__":
    main()
