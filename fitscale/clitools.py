"""The command line's primitives, which every `cli.py` imports: `--set` parsing, the user-error types.

On the ground floor (it imports only fitscale.errors and fitscale.diskspace), so that a command of
any layer, and the SLURM job that reports a rank's failure, share one definition with the
dispatcher (fitscale/cli.py) without importing it.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from fitscale.diskspace import OutOfSpaceError
from fitscale.errors import UserError


class CommandError(UserError):
    """An error with a one-line, user-facing reason; printed without a traceback (FITSCALE_DEBUG=1 shows it)."""


def add_set_option(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """`--set KEY=VALUE ...`, the one definition every command uses; the items go to `args.overrides`.

    `--set a=1 --set b=2` and `--set a=1 b=2` are the same: every item of every `--set`, in command-line
    order (a later item for the same key wins). Items are split by `fitscale.config.split_override`
    (the value is everything after the first `=`), which names an item that is not KEY=VALUE.
    """
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example}; takes several items and may be repeated",
    )


def set_option_args(overrides: list[str]) -> list[str]:
    """`overrides` as command-line arguments for a child command: `--set` and the items, or nothing."""
    return ["--set", *overrides] if overrides else []


# Printed as one line with exit status 2: UserError (bad input, diagnosed: ConfigError, CommandError and
# the other fitscale errors that name a file or field), FileNotFoundError / FileExistsError (a path that
# is missing or already there), ImportError (an optional dependency that is not installed, whose message
# says which extra to install), OutOfSpaceError (a full disk or quota, naming the path, the bytes and the
# fix). Any other exception, a plain ValueError included, is a bug: its traceback, a line saying how
# to report it (BUG_NOTE), and status 1.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, ImportError, OutOfSpaceError)
BUG_NOTE = (
    "fitscale {command}: this is a bug in fitscale or a library it uses, not bad input; please report it "
    "with the traceback above, the command line and its recipe"
)


def show_own_warnings_in_one_line(command: str) -> None:
    """Print fitscale's own warnings (categories defined in fitscale, e.g. TornRecordWarning) as one
    line `fitscale CMD: warning: MESSAGE` on stderr, instead of Python's two lines naming a source
    file and line of fitscale; other libraries' warnings keep Python's format."""
    original = getattr(warnings.showwarning, "python_showwarning", warnings.showwarning)  # once per process

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "fitscale":
            print(f"fitscale {command}: warning: {message}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    show.python_showwarning = original  # a later command of the same process wraps Python's, not ours
    warnings.showwarning = show
