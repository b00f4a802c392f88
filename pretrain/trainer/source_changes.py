"""``data.sources``: opening a mixture, what its checkpoints record, and what a resume may change.

- **opened**: every source's manifest; they must share one tokenizer (the sha256 of their
  ``tokenizer.json``), ``seq_len`` and dtype, else one line naming both sources;
- **recorded**: the tokenizer and each source's name, shard set (sha256 of its manifest) and weight
  (``TrainState.data_identity["sources"]``), and the loader's state (``data/mixture.py``);
- **at a resume**: other weights are applied from the resumed step (one console line and a
  ``{"event": "mixture_weights", "old", "new"}`` line in ``metrics.jsonl``); a source is matched
  by name and shard set (else by shard set alone: a rename, or the ``data.dir`` of a one-source
  run), and each matched source goes on from its recorded position. A source added, dropped or
  given another shard set is refused in one line unless ``data.allow_new=true`` (then it starts
  at its beginning; ``{"event": "mixture_sources"}``). ``data.dir`` and ``data.sources`` convert
  into each other the same way, in either direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.errors import UserError
from conf.groups import DataConfig, source_name
from data.mixture import Source
from data.remote import RemoteOptions, is_remote
from data.shards import check_files, load_manifest
from parallel.run_config import Run, as_plain, replaced
from parallel.train_state import TrainState
from pretrain.trainer.resume_checks import data_identity, same_tokenizer


def _local(directory: str) -> str:
    if is_remote(directory):
        return directory
    return str(Path(directory).expanduser().resolve())  # config.yaml and checkpoints work from any cwd


def resolved_sources(data: DataConfig) -> DataConfig:
    """``data`` with every source's dir resolved (config.yaml and checkpoints work from any cwd) and
    its name filled in: the sources as the run records them."""
    specs = []
    for spec in data.sources:
        directory = _local(spec.dir)
        specs.append(replaced(spec, dir=directory, name=source_name(directory, spec.name)))
    return replaced(data, sources=specs)


def open_sources(data: DataConfig, model_seq_len: int) -> tuple[list[Source], dict[str, Any]]:
    """The sources of ``data.sources`` (:func:`resolved_sources`) and the identity a checkpoint
    records; refuses sources that do not fit together in one line."""
    sources, identities = [], []
    for spec in data.sources:
        if spec.dir == _local(spec.dir) and not Path(spec.dir).is_dir():
            raise UserError(f"data.sources: {spec.name}: {spec.dir}: no such directory (run gpt-prepare first)")
        manifest = load_manifest(spec.dir, RemoteOptions.from_config(as_plain(data)))  # a dir or URL
        check_files(manifest)
        sources.append(Source(str(spec.name), manifest, float(spec.weight)))
        identities.append(data_identity(manifest))
    first, ident = sources[0], identities[0]
    for source, other in zip(sources[1:], identities[1:], strict=True):
        for what, a, b in (
            ("tokenizer (tokenizer.json)", True, same_tokenizer(ident, other)),
            ("seq_len", first.manifest.seq_len, source.manifest.seq_len),
            ("dtype", first.manifest.dtype, source.manifest.dtype),
        ):
            if a != b:
                shown = "" if what.startswith("tokenizer") else f": {a} vs {b}"
                raise UserError(
                    f"data.sources: {source.name} ({other['data_dir']}) and {first.name} ({ident['data_dir']}) have "
                    f"another {what}{shown}; a mixture's sources share one "
                    f"(gpt-prepare tokenizer=file:{ident['data_dir']})"
                )
    if first.manifest.seq_len > model_seq_len:
        raise UserError(
            f"data.sources: {first.name} ({ident['data_dir']}) has seq_len={first.manifest.seq_len} > "
            f"model.seq_len={model_seq_len}"
        )
    identity = {k: ident[k] for k in ("tokenizer", "vocab_size", "tokenizer_sha256", "tokenizer_digests")}
    identity["sources"] = [
        {"name": s.name, "data_dir": i["data_dir"], "data_sha256": i["data_sha256"], "weight": s.weight}
        for s, i in zip(sources, identities, strict=True)
    ]
    return sources, identity


class DataResume:
    """How the loader state of a checkpoint carries over to the sources in effect (module docstring)."""

    def __init__(self, config: Run, state: TrainState, identity: dict[str, Any]):
        self.step = state.step
        self.events: list[dict[str, Any]] = []
        self.pairs: dict[str, str] = {}  # source in effect -> its name in the checkpoint
        old = state.data_identity or {}
        run = config.run.dir
        if not same_tokenizer(old, identity):
            raise UserError(
                f"run.dir={run} was trained with another tokenizer ({old.get('tokenizer', '?')}, vocab "
                f"{old.get('vocab_size', '?')}) than data.sources ({identity['tokenizer']}, vocab "
                f"{identity['vocab_size']}); use a new run.dir"
            )
        new = identity.get("sources") or [_single(identity)]
        before = old.get("sources") or ([_single(old)] if "data_sha256" in old else [])
        self.restore = not state.weights_only and bool(before)
        for same_name in (True, False):  # same name and shard set; then the same shard set (a rename, data.dir)
            for source in new:
                taken = set(self.pairs.values())
                match = next(
                    (
                        o
                        for o in before
                        if o["name"] not in taken
                        and o["data_sha256"] == source["data_sha256"]
                        and (o["name"] == source["name"] or not same_name)
                    ),
                    None,
                )
                if source["name"] not in self.pairs and match is not None:
                    self.pairs[source["name"]] = match["name"]
        added = [s for s in new if s["name"] not in self.pairs]
        removed = [o for o in before if o["name"] not in self.pairs.values()]
        if self.restore and (added or removed):
            if not config.data.allow_new:
                raise UserError(_refusal(added, removed, before, run))
            self.events.append(
                {
                    "event": "mixture_sources",
                    "added": [s["name"] for s in added],
                    "removed": [o["name"] for o in removed],
                    "renamed": {n: o for n, o in self.pairs.items() if n != o},
                }
            )
        self.restore = self.restore and bool(self.pairs)

    def loader_state(self, saved: dict[str, Any], mixture: bool) -> dict[str, Any]:
        """``saved`` (either loader's state) as the state of the loader in effect, renamed."""
        common = {"seed": saved.get("seed"), "num_streams": saved["num_streams"]}
        if "mixture" in saved:
            sources = {new: saved["sources"][old] for new, old in self.pairs.items()}
            segment = saved.get("segment")
            if segment is not None:
                back = {old: new for new, old in self.pairs.items()}
                weights = {back.get(n, n): w for n, w in segment["weights"].items()}
                start = {back[n]: c for n, c in segment["start"].items() if n in back}
                # another set of sources never continues the old segment, even under the same names
                segment = {"row": segment["row"], "weights": weights, "start": start, "restart": bool(self.events)}
            state = {"mixture": 1, **common, "position": saved.get("position", 0), "segment": segment}
        else:  # data/stream.py's one-source state
            sources = {new: {"epoch": saved["epoch"], "position": saved["position"]} for new in self.pairs}
            state = {"mixture": 1, **common, "position": 0, "segment": None}
        if mixture:
            return {**state, "sources": sources}
        (cursor,) = sources.values()
        return {**common, "epoch": cursor["epoch"], "position": cursor["position"]}


def _refusal(added: list[dict], removed: list[dict], before: list[dict], run: str) -> str:
    """One line for the first source added, dropped or given another shard set without data.allow_new."""
    names = ", ".join(o["name"] for o in before)
    old = {o["name"]: o for o in before}
    if added and added[0]["name"] in old:
        s = added[0]
        was = old[s["name"]]["data_dir"]
        what = f"{s['name']} ({s['data_dir']}) is another shard set than the run's {s['name']} ({was})"
        action = "start it anew"
    elif added:
        s = added[0]
        what, action = f"{s['name']} ({s['data_dir']}) is not a source of the run (its sources: {names})", "add it"
    else:
        s = removed[0]
        what, action = f"the run's source {s['name']} ({s['data_dir']}) is missing", "drop it"
    return f"data.sources: {what} in run.dir={run}; pass data.allow_new=true to {action}"


def _single(identity: dict[str, Any]) -> dict[str, Any]:
    """A ``data.dir`` identity as a one-source list (named like the source its dir would be)."""
    return {
        "name": source_name(str(identity.get("data_dir", "")), None),
        "data_dir": identity.get("data_dir"),
        "data_sha256": identity.get("data_sha256"),
    }


def weights_line(step: int, old: dict[str, float], new: dict[str, float]) -> str:
    def shown(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}" if abs(x * 100 - round(x * 100)) < 1e-6 else f"{x:.4g}"

    names = list(new) + [n for n in old if n not in new]
    changes = ", ".join(f"{n} {shown(old.get(n))}→{shown(new.get(n))}" for n in names)
    return f"data: mixture weights changed at step {step}: {changes}"


def per_source_validation(losses: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """``val_loss/<name>`` of each source with a validation split, and ``val_loss``: their mean
    weighted by the mixture's weights (the loss under the training distribution)."""
    import math

    out = {f"val_loss/{name}": loss for name, loss in losses.items()}
    total = sum(weights[name] for name in losses)
    if losses and total > 0:
        out["val_loss"] = sum(weights[name] * loss for name, loss in losses.items()) / total
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    return out
