"""The errors a user can cause while building a corpus or training, and how a command reports them."""

from __future__ import annotations

import sys
from pathlib import Path


class DataError(ValueError):
    """A corpus that cannot be built or read; the message says what is wrong and how to fix it."""


class RecipeError(ValueError):
    """A recipe (or launch) that cannot train; the message names the field and says how to fix it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C / SIGTERM once the checkpoint of the interrupted step is saved."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


# What a command catches around its work and hands to `exit_code`; anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, RecipeError, TrainingInterrupted)


def exit_code(error: DataError | RecipeError | TrainingInterrupted, command: str, resume_hint: str = "",
              echo: bool = True) -> int:
    """Print `error` for the user of `command` (e.g. "parloop train") and return the process exit code.

    A bad corpus or recipe exits with 2, as argparse does for bad arguments; an interrupted training exits with 130
    (the shell's code for Ctrl-C) after saying how to continue (`resume_hint`). `echo=False` only computes the
    code, for the processes of a multi-process run that do not print.
    """
    if isinstance(error, TrainingInterrupted):
        message, code = f"{error}\n{resume_hint}" if resume_hint else str(error), 130
    else:
        message, code = f"{command}: error: {error}", 2
    if echo:
        print(message, file=sys.stderr)
    return code
