"""What every console script shares: one-line errors and early checks of Hydra choices."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from conf import schema, tool_schemas  # noqa: F401 - register the commands' schemas in Hydra's ConfigStore
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
    saves first, see ``pretrain/trainer/preemption.py``) into one line + exit 130: no tracebacks for
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


# Hydra's flags: those that take a value, and those after which argv is not a job's overrides
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")
_FLAGS_NOT_A_JOB = ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")
_FLAGS_NOT_A_JOB += ("--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun")
_CONFIG_DIR = ("--config-dir", "-cd")  # an extra dir of presets (gpt-import writes RUN_DIR/conf/model/NAME.yaml)
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def groups_of(config_name: str = "config") -> tuple[str, ...]:
    """The config groups a command's config selects presets of (its ``defaults:`` list)."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(CONF_DIR / f"{config_name}.yaml").get("defaults", [])
    names = [str(k).split()[-1] for entry in defaults if isinstance(entry, DictConfig) for k in entry]
    return tuple(sorted(name for name in names if (CONF_DIR / name).is_dir()))


def answer_help(argv: list[str], config_name: str, groups: tuple[str, ...] | None = None) -> None:
    """``--help`` / ``-h``: this command's own groups and keys, then exit 0.

    Hand-written because Hydra's help lists every group of the config dir (those of other commands
    too) and rebuilds its config repository once per group (a deep copy each: seconds); this composes
    the command's config once. Overrides on the same line are applied, so ``model=llama-tiny --help``
    shows that preset's values. ``--hydra-help`` is still Hydra's."""
    if not any(arg in ("--help", "-h") for arg in argv):
        return
    from omegaconf import OmegaConf

    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    try:
        cfg = compose(overrides, config_name)
    except Exception:  # noqa: BLE001 - a bad override: show the defaults (running it says what is wrong)
        cfg = compose([], config_name)
    own = groups_of(config_name) if groups is None else groups
    lines = [
        f"{Path(sys.argv[0]).name}: key=value overrides of the config below (conf/{config_name}.yaml); "
        "group=option picks a preset.",
        "  --cfg job: print the composed config and exit; --multirun: sweep comma-separated values; "
        "--hydra-help: Hydra's own flags",
        "",
    ]
    if own:
        lines.append("== Configuration groups ==")
        lines += [f"{g}: {', '.join(sorted(p.stem for p in (CONF_DIR / g).glob('*.yaml')))}" for g in own]
        lines.append("")
    lines += ["== Config ==", OmegaConf.to_yaml(cfg).rstrip()]
    print("\n".join(lines))
    sys.exit(0)


def check_group_choices(argv: list[str], groups: tuple[str, ...] | None = None, config_name: str | None = None) -> None:
    """Refuse a bad command line in one line (exit 2) before Hydra composes it: an unknown preset
    (``parallel=nope``: the known ones are listed), an unknown key (``train.nope=1``), a value of
    the wrong type (``train.max_steps=abc``), a malformed override. Hydra would print several lines
    and exit 1. With ``--multirun`` every value of every sweep is checked. Value checks
    (:func:`conf.schema.validate`) are the trainer's first step, so ``--cfg job`` prints any values.

    ``config_name`` is the command's config (``config``, ``finetune``); by default the one of the
    running command (``gpt-finetune`` / ``pretrain/finetune.py``: ``finetune``, else ``config``)."""
    if config_name is None:
        config_name = "finetune" if Path(sys.argv[0]).stem in ("finetune", "gpt-finetune") else "config"
    answer_help(argv, config_name, groups)
    overrides, multirun, extra_dirs = [], False, []
    args = iter(argv)
    for arg in args:
        if arg in ("--multirun", "-m"):
            multirun = True
        elif arg in _FLAGS_WITH_VALUE:
            next(args, None)
        elif arg.split("=")[0] in _CONFIG_DIR:
            directory = Path(arg.split("=", 1)[1] if "=" in arg else next(args, "")).expanduser()
            if not directory.is_dir():
                fail(f"--config-dir {directory}: not a directory")
            extra_dirs.append(directory.resolve())
        elif arg.split("=")[0] in _FLAGS_NOT_A_JOB:
            return
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)
    known_groups = groups_of(config_name) if groups is None else groups
    searched = [CONF_DIR, *extra_dirs]
    for job in _jobs(overrides, multirun):
        for arg in job:
            name, sep, value = arg.partition("=")
            name = name.lstrip("+~")
            found = any((d / name / f"{value}.yaml").is_file() for d in searched)
            if sep and name in known_groups and value and not found:
                known = sorted({p.stem for d in searched for p in (d / name).glob("*.yaml")})
                fail(f"{name}={value}: unknown preset (known: {', '.join(known)})")
        if extra_dirs:
            job = [*job, f"hydra.searchpath=[{','.join(f'file://{d}' for d in extra_dirs)}]"]
        _check_composes(job, config_name)


def check_command_line(argv: list[str], config_name: str) -> None:
    """gpt-eval's, gpt-generate's, gpt-export's and gpt-import's :func:`check_group_choices` (they have
    no groups): ``--help``, then an unknown key checked against the command's own schema tree
    (:func:`conf.tool_schemas.unknown_override`: their ``eval`` and ``run`` are not gpt-pretrain's),
    then types and syntax; each one ``error:`` line and exit 2."""
    answer_help(argv, config_name, groups=())
    wrong = tool_schemas.unknown_override(argv, tool_schemas.TOOL_ROOTS[config_name])
    if wrong:
        fail(wrong)
    check_group_choices(argv, groups=(), config_name=config_name)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists to check: the command line, or (``--multirun``) each value of each sweep
    with the other sweeps at their first value (every value is checked, not every combination)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if not multirun:
        return [overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        _bad_syntax(exc)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and override.is_discrete_sweep():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        elif override.is_sweep_override():  # a range / interval sweep: Hydra's sweeper explains
            choices.append([])
        else:
            choices.append([f"{key}={override.get_value_element_as_str()}"])
    firsts = [values[:1] for values in choices]
    jobs = [[v for values in firsts for v in values]]
    for i, values in enumerate(choices):
        for value in values[1:]:
            jobs.append([v for j, other in enumerate(firsts) for v in ([value] if j == i else other)])
    return jobs


def _check_composes(overrides: list[str], config_name: str) -> None:
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from conf.schema import one_line, unknown_added_key, unknown_key

    try:
        cfg = compose(overrides, config_name)
    except OverrideParseException as exc:
        _bad_syntax(exc)
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc)
        written = _override_named(text, overrides)
        element = _list_element_problem(exc, written)
        if element:
            fail(element)
        if "Ambiguous value for argument" in text:
            key = written.lstrip("+~").partition("=")[0]
            fail(f"{written}: a sweep needs --multirun (a list: {key}=[a,b]; a string with commas: quote it)")
        if "No match in the defaults list" in text:
            groups = ", ".join(groups_of(config_name))
            fail(f"{written or _first_line(exc)}: not a config group of this command (its groups: {groups})")
        if "To append to your config use +" in text or "Could not append to config" in text:
            fail(unknown_key(written.lstrip("+~").partition("=")[0], config_name))
        if written and ("Error merging override" in text or "Could not override" in text):
            key, _, value = written.lstrip("+~").partition("=")
            line = one_line(exc, value=value, config_name=config_name)
            fail(line if line.startswith(key) else f"{written}: {line}")
        fail(one_line(exc, config_name=config_name) if exc.__cause__ else _first_line(exc))
    # `+train.nope=1` composes: the schema refuses it (the tool commands' keys: check_command_line, whose
    # `eval` and `run` groups are not gpt-pretrain's, which unknown_added_key knows)
    added = None if config_name in tool_schemas.TOOL_ROOTS else unknown_added_key(cfg, config_name)
    if added:
        fail(added)


def _list_element_problem(exc: BaseException, written: str) -> str:
    """One line for an override of a list of typed elements (``data.sources``): an element the list
    does not have yet (``data.sources.1.weight=`` without ``data.sources=[...]``), or a key its
    elements do not have; '' for any other error."""
    from conf import groups

    key = written.lstrip("+~").partition("=")[0]
    cause: BaseException | None = exc
    while cause is not None:
        text, full = str(cause), str(getattr(cause, "full_key", "") or "")
        missing = re.fullmatch(r"(.+)\[(\d+)\]", full)
        if missing and "Invalid type assigned: dict" in text:
            name, index = missing.groups()
            return f"{written}: {name} has no element {index} (give the list first: {name}=[{{...}},...])"
        unknown = re.search(r"Key '(\w+)' not in '(\w+)'", text)
        element = getattr(groups, unknown.group(2), None) if unknown else None
        if unknown and dataclasses.is_dataclass(element) and ("[" in full or written.partition("=")[2].startswith("[")):
            fields = [f.name for f in dataclasses.fields(element)]
            close = difflib.get_close_matches(unknown.group(1), fields, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}?" if close else f"an element has: {', '.join(fields)}"
            where = re.sub(r"\[(\d+)\]", r".\1", full) if "[" in full else f"{key}: an element's key {unknown.group(1)}"
            return f"{where}: unknown key ({hint})" if "[" in full else f"{where} is unknown ({hint})"
        cause = cause.__cause__ or cause.__context__
    return ""


def _bad_syntax(exc: Exception) -> None:
    fail(f"{getattr(exc, 'override', '?')}: not a valid override ({_first_line(exc)}; see {GRAMMAR})")


def _override_named(text: str, overrides: list[str]) -> str:
    """The override a Hydra error message is about (it quotes it), or ''."""
    for arg in sorted(overrides, key=len, reverse=True):
        if arg in text or f"'{arg.lstrip('+~').partition('=')[0]}'" in text:
            return arg
    return ""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(exc).__name__)


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
