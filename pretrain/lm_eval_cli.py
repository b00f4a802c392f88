"""``lm_eval`` / ``lm-eval``: lm-eval's own CLI, with the models of installed packages known by name.

lm-eval resolves ``--model NAME`` against its registry. Its plugin mechanism is the
``lm_eval.models`` entry-point group (pyproject.toml declares ``gpt-pretrain`` there), but
0.4.13 reads no entry points (their discovery came after it), so nothing of ours is known
unless a user imports it. These console scripts replace lm-eval's two: they register each
entry point of that group lm-eval does not already know, as a lazy ``module:object``
placeholder (as lm-eval registers its own models: nothing is imported until a run asks for
the name; built-in names win), then run lm-eval's CLI unchanged. A :class:`UserError` (a
missing checkpoint, a bad model_arg) is one line and exit 2, as in the project's other commands.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "lm_eval.models"


def register_entry_points() -> list[str]:
    """Register the ``lm_eval.models`` entry points lm-eval does not know yet; returns their names."""
    import lm_eval.models  # noqa: F401 - lm-eval's built-in names first: they win over a plugin's
    from lm_eval.api.registry import model_registry

    added = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in model_registry:
            model_registry.register(entry.name, target=entry.value)
            added.append(entry.name)
    return added


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from conf.cli import exit_on_user_error

    register_entry_points()
    with exit_on_user_error():
        cli_evaluate()


if __name__ == "__main__":
    main()
