"""Value checks of the ``train`` and ``logging`` groups, run before any process group or file.

A bad value otherwise surfaces as a torch traceback deep inside the optimizer (``lr=-1``)
or as a run that silently does nothing (``max_steps=-5``). Each check is one line naming
the key, so users fix it without reading code.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig

from conf.errors import UserError


def _number(cfg: DictConfig, key: str, kind: type = float) -> float:
    group, name = key.split(".")
    value = cfg[group][name]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value}: expected a number") from None


def check_train(cfg: DictConfig) -> None:
    """The ``train`` knobs every training command shares."""
    positive = ("train.lr", "train.micro_batch", "train.global_batch", "train.eval_micro_batch", "train.keep_last")
    for key in positive:
        if _number(cfg, key) <= 0:
            raise UserError(f"{key}={_number(cfg, key):g}: must be > 0")
    for key in ("train.max_steps", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.eval_every"):
        if key.split(".")[1] in cfg.train and _number(cfg, key) < 0:
            raise UserError(f"{key}={_number(cfg, key):g}: must be >= 0")
    if not 0.0 <= _number(cfg, "train.min_lr_ratio") <= 1.0:
        raise UserError(f"train.min_lr_ratio={cfg.train.min_lr_ratio}: must be in [0, 1]")
    for key in ("train.beta1", "train.beta2"):
        if not 0.0 <= _number(cfg, key) < 1.0:
            raise UserError(f"{key}={cfg.train[key.split('.')[1]]}: must be in [0, 1)")
    if str(cfg.train.lr_schedule) not in ("cosine", "linear", "constant", "inverse-square-root"):
        raise UserError(f"train.lr_schedule={cfg.train.lr_schedule}: expected cosine, linear or constant")
    if cfg.train.get("lr_decay_steps") is not None and _number(cfg, "train.lr_decay_steps") < 1:
        raise UserError(f"train.lr_decay_steps={cfg.train.lr_decay_steps}: must be >= 1 (or null: max_steps)")
    if cfg.train.get("spike_factor") is not None and _number(cfg, "train.spike_factor") <= 1.0:
        raise UserError(f"train.spike_factor={cfg.train.spike_factor}: must be > 1 (or null: off)")
    if "max_skipped" in cfg.train and _number(cfg, "train.max_skipped", int) < 1:
        raise UserError(f"train.max_skipped={cfg.train.max_skipped}: must be >= 1")
    if "save_every" in cfg.train and _number(cfg, "train.save_every", int) < -1:
        raise UserError(f"train.save_every={cfg.train.save_every}: must be >= 0 (or -1: never)")


def check_logging(cfg: DictConfig) -> None:
    """``logging.wandb``: a known mode, and credentials for ``online`` (else wandb would prompt
    or fail minutes later, after the model was built)."""
    mode = str(cfg.logging.wandb)
    if mode not in ("offline", "online", "disabled"):
        raise UserError(f"logging.wandb={mode}: expected offline, online or disabled")
    if mode == "online" and not _wandb_credentials():
        raise UserError(
            "logging.wandb=online: no wandb credentials (set WANDB_API_KEY or run `wandb login`); "
            "logging.wandb=offline logs locally and syncs later with `wandb sync`"
        )


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
