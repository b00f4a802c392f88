"""What every console script shares: one-line errors and early checks of Hydra choices."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from conf.errors import RunError, UserError

CONF_DIR = Path(__file__).resolve().parent
EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one line to stderr and exit (2: the user's input or config; 1: the run cannot go on)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn :class:`UserError` and missing required keys into a one-line error + exit 2,
    :class:`RunError` into one line + exit 1, and a Ctrl-C outside the training loop (which
    saves first, see ``pretrain/preemption.py``) into one line + exit 130: no tracebacks for
    anything a user can cause."""
    try:
        yield
    except UserError as exc:
        fail(str(exc))
    except RunError as exc:
        fail(str(exc), EXIT_RUN_ERROR)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        fail(f"{key}=: required (pass {key}=...)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def quiet_third_party() -> None:
    """Warnings that say nothing actionable on this project's paths: megatron-core's notes that
    Apex / Transformer Engine are absent (expected on CPU), and torch's deprecation of the
    ShardedTensor API that megatron-core's dist_checkpointing still uses."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*(Apex|apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", message=r".*Please use DTensor instead.*")
    warnings.filterwarnings("ignore", message=r".*`load_state_dict` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor|all_gather_into_tensor.*is deprecated.*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # its shard writers' errors reach users through the save's own one-line error (cause and path)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)


def check_group_choices(argv: list[str], groups: tuple[str, ...] = ("model",)) -> None:
    """Reject an unknown preset (``model=nope``) in one line before Hydra composes."""
    for arg in argv:
        name, sep, value = arg.partition("=")
        name = name.lstrip("+~")
        known_choice = (CONF_DIR / name / f"{value}.yaml").is_file()
        if sep and name in groups and value and "," not in value and not known_choice:
            known = sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))
            fail(f"{name}={value}: unknown preset (known: {', '.join(known)})")


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """The config a console script would see for ``overrides`` (for tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def set_rank_threads() -> None:
    """One OpenMP thread per rank under torchrun / srun (ranks share the cores) unless the user
    set ``OMP_NUM_THREADS``; a single process keeps torch's default (all cores)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
