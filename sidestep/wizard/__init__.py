"""The interactive wizard: `sidestep` with no arguments, or `sidestep wizard`.

It asks, then builds the same config dataclasses the CLI commands build and calls the same library
functions; nothing here has its own defaults or its own logic for running a job.
"""

__all__ = ["run_wizard"]


def run_wizard(asker=None) -> None:  # noqa: ANN001 - thin re-export without importing prompts eagerly
    from sidestep.wizard.menu import run_wizard as _run

    _run(asker)
