"""One line for every bad input (issue 29): a broken file or a nonsensical number given to a console
script is one ``error:`` line on stderr and exit 2, before any work, never a traceback.

The inputs: gpt-import sources with a truncated or malformed ``model.safetensors``, a tensor of the
wrong shape or dtype, a missing tensor, an index naming a missing or broken shard (test_import's
small GPT-2 and sharded Llama sources, corrupted); gpt-plan's numeric keys; a broken
``tokenizer.json`` in a data dir (gpt-pretrain) and given to ``gpt-prepare tokenizer=file:``. Every
command is run as a user runs it, three at a time, once for the module (each is an interpreter
start and the imports before its check); the other numeric keys of gpt-plan are checked in process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conf.errors import UserError
from tests.conftest import TINYSHAKESPEARE, run_cli
from tests.integration.test_import import gpt_import, make_source
from tests.unit.test_plan_cli import plan_run

PLAN = ["hardware=h100-sxm", "logging.wandb=disabled"]  # gpt-plan's arguments, with a gpus_per_node
# case: the words its one line must hold (the file or key, the tensor, expected and found shapes)
EXPECTED = {
    "import-truncated": ["gpt2-truncated/model.safetensors: truncated: tensor"],
    "import-malformed": ["gpt2-malformed/model.safetensors: malformed safetensors header"],
    "import-shape": ["tensor transformer.h.0.attn.c_attn.weight has shape [64, 190]", "implies [64, 192]"],
    "import-dtype": ["tensor transformer.h.1.mlp.c_fc.weight has dtype I8"],
    "import-missing": ["transformer.ln_f.bias: missing from", "gpt2-missing/model.safetensors"],
    "import-shard-missing": ["model-00002-of-00005.safetensors is listed in model.safetensors.index.json but missing"],
    "import-shard-broken": ["llama-shard-broken/model-00003-of-00005.safetensors: truncated: tensor"],
    "plan-vocab-negative": ["vocab_size=-3: must be an integer >= 1"],
    "plan-vocab-zero": ["vocab_size=0: must be an integer >= 1"],
    "prepare-tokenizer": ["broken-data/tokenizer.json: not a tokenizer file"],
    "pretrain-tokenizer": ["broken-data/tokenizer.json: not a tokenizer file"],
}


def _rewrite(path: Path, change: Callable[[dict], None]) -> None:
    """Re-save a safetensors file with ``change`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _import_sources(root: Path) -> dict[str, list[str]]:
    """gpt-import's broken sources: test_import's GPT-2 (one file) and Llama (five shards), corrupted."""
    import torch

    good = {arch: make_source(arch, root / arch) for arch in ("gpt2", "llama")}

    def broken(arch: str, case: str) -> Path:
        return Path(shutil.copytree(good[arch], root / f"{arch}-{case}"))

    weights = broken("gpt2", "truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    header = b'{"transformer.wte.weight": {"dtype": "F32", "shape": [300'  # a header cut in the middle
    (broken("gpt2", "malformed") / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    qkv = "transformer.h.0.attn.c_attn.weight"
    _rewrite(broken("gpt2", "shape") / "model.safetensors", lambda t: t.update({qkv: t[qkv][:, :190].clone()}))
    fc = "transformer.h.1.mlp.c_fc.weight"
    _rewrite(broken("gpt2", "dtype") / "model.safetensors", lambda t: t.update({fc: t[fc].to(torch.int8)}))
    _rewrite(broken("gpt2", "missing") / "model.safetensors", lambda t: t.pop("transformer.ln_f.bias"))
    (broken("llama", "shard-missing") / "model-00002-of-00005.safetensors").unlink()
    shard = broken("llama", "shard-broken") / "model-00003-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    cases = ["truncated", "malformed", "shape", "dtype", "missing"]
    commands = {f"import-{c}": [f"source={root / f'gpt2-{c}'}", f"out={root / f'out-{c}'}"] for c in cases}
    for c in ("shard-missing", "shard-broken"):
        commands[f"import-{c}"] = [f"source={root / f'llama-{c}'}", f"out={root / f'out-{c}'}"]
    return commands


@pytest.fixture(scope="module")
def results(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's command, run concurrently once: case -> its finished process. gpt-pretrain (the
    slowest: it imports megatron-core before its task reads the data) starts first, the import
    sources are built while it runs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data = Path(shutil.copytree(char_shards, root / "broken-data"))  # a prepared dir, then its tokenizer cut short
    (data / "tokenizer.json").write_bytes((char_shards / "tokenizer.json").read_bytes()[:40])
    text = root / "text.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:2000])
    clis = {
        "pretrain-tokenizer": [
            "pretrain.train", f"data.dir={data}", f"run.dir={root / 'run'}", "model=tiny", "train.max_steps=1",
            "logging.wandb=disabled",
        ],
        "prepare-tokenizer": ["data.prepare", f"input={text}", f"out={root / 'prepared'}", f"tokenizer=file:{data}"],
        "plan-vocab-negative": ["pretrain.plan", *PLAN, "hardware.gpus_per_node=1", "vocab_size=-3"],
        "plan-vocab-zero": ["pretrain.plan", *PLAN, "hardware.gpus_per_node=1", "vocab_size=0"],
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=3) as pool:
        started = {case: pool.submit(run_cli, *args, timeout=300) for case, args in clis.items()}
        imports = _import_sources(root)
        started |= {case: pool.submit(gpt_import, *args) for case, args in imports.items()}
        done = {case: future.result() for case, future in started.items()}
    # nothing was written: no run dir, no prepared dir, no imported run
    assert not (root / "run").exists() and not (root / "prepared").exists() and not list(root.glob("out-*"))
    return done


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_one_line(results: dict[str, subprocess.CompletedProcess], case: str) -> None:
    result = results[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and 1 <= len(lines) <= 4, result.stderr[-3000:]
    error = next((line for line in lines if line.startswith("error: ")), "")
    assert all(words in error for words in EXPECTED[case]), (case, result.stderr[-3000:])


@pytest.mark.parametrize(
    "override",
    [
        "vocab_size=-3", "vocab_size=0", "top=0", "hardware.gpus_per_node=0", "hardware.nodes=-1",
        "hardware.memory_gb=0", "hardware.peak_tflops_bf16=-1", "hardware.intra_node_gbps=0", "model.seq_len=0",
        "model.hidden_size=-64", "train.micro_batch=0", "train.global_batch=-8", "parallel.tp=0",
        "data.num_streams=0",
    ],
)  # fmt: skip
def test_every_numeric_plan_key_is_checked(override: str, capsys: pytest.CaptureFixture) -> None:
    """In process (the same code as the command's): a non-positive number is one line naming its key."""
    key = override.split("=")[0]
    gpus = [] if key == "hardware.gpus_per_node" else ["hardware.gpus_per_node=1"]
    try:
        code, _, err = plan_run([*PLAN, *gpus, override], capsys)
    except UserError as exc:  # gpt-plan's own keys, refused before its checks (main prints it the same way)
        code, err = 2, f"error: {exc}\n"
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {key}="), err


def test_a_tokenizer_that_does_not_match_its_manifest_is_refused(char_shards: Path, tmp_path: Path) -> None:
    """A valid tokenizer.json replaced after gpt-prepare (fewer characters) is no tokenizer of those shards."""
    from data.tokenizer import CharTokenizer, check_saved_tokenizer, load_tokenizer

    manifest = json.loads((char_shards / "manifest.json").read_text())
    check_saved_tokenizer(char_shards, manifest["vocab_size"], manifest["eot_id"])  # the prepared one passes
    CharTokenizer(load_tokenizer(char_shards).chars[:-1]).save(tmp_path)
    with pytest.raises(UserError, match=r"tokenizer.json: vocab 66, .* manifest.json says vocab 67"):
        check_saved_tokenizer(tmp_path, manifest["vocab_size"], manifest["eot_id"])
