"""`fitscale <command>`: a thin dispatcher; each command lives with the code it drives.

Every area registers its subcommands through a `register(subparsers)` function in its own
`cli` module, so this file never grows and importing it stays cheap (heavy imports happen
inside the command functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from fitscale.clitools import BUG_NOTE, USER_ERRORS, CommandError, show_own_warnings_in_one_line  # noqa: F401

# Modules that contribute subcommands, in the order they appear in `fitscale --help`.
COMMAND_MODULES = (
    "fitscale.models.cli",  # info
    "fitscale.config.cli",  # config show|fields
    "fitscale.data.cli",  # data synth|digits|from-images|from-fit-latents|stats
    "fitscale.train.cli",  # train
    "fitscale.checkpoint.cli",  # convert
    "fitscale.launch.cli",  # launch
    "fitscale.sweep.cli",  # sweep
    "fitscale.sample.cli",  # sample
    "fitscale.eval.cli",  # eval, eval-ref, eval-paper
    "fitscale.report.cli",  # report, status
)


def build_parser() -> argparse.ArgumentParser:
    """The `fitscale` argument parser with every command's subparser (each registered by its package's
    cli.py).
    """
    parser = argparse.ArgumentParser(
        prog="fitscale", description="Train FiTv2 diffusion transformers at scale."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # that area is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `fitscale` command with `argv` (default: sys.argv[1:]) and return its exit status.

    A user error (USER_ERRORS: bad input, config errors, missing files or extras) prints one line
    `fitscale CMD: error: ...` and returns 2; a Ctrl-C that reaches the command as KeyboardInterrupt
    (during start-up, before training's own handler listens) prints `fitscale CMD: interrupted
    (Ctrl-C); stopped` and returns 130; any other exception is a bug: its traceback, a line saying how to
    report it (BUG_NOTE), and status 1. With FITSCALE_DEBUG=1 every exception propagates. Inside a launched rank the error is recorded for the launcher, which reports
    the first failing rank once, and the rank exits at once.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from fitscale.runtime.failures import WorkerFailed, in_launched_rank, record_failure

    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command relaunches itself with
    show_own_warnings_in_one_line(args.command)
    try:
        result = args.func(args)
    except WorkerFailed as error:  # a rank this process launched: its line (or traceback), its status
        details = error.details if os.environ.get("FITSCALE_DEBUG") and error.details else None
        print(details.rstrip() if details else f"fitscale {args.command}: error: {error}", file=sys.stderr)
        return error.code
    except BrokenPipeError:  # `fitscale info ... | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C where no handler of ours listens (start-up, a command without one)
        if os.environ.get("FITSCALE_DEBUG"):
            raise
        from fitscale.config.checkpoint import INTERRUPTED_STATUS

        print(f"fitscale {args.command}: interrupted (Ctrl-C); stopped", file=sys.stderr)
        if in_launched_rank():  # as for an error: no teardown of a half-built process group
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED_STATUS)
        return INTERRUPTED_STATUS
    except (SystemExit, GeneratorExit):  # their own meaning: not a failure to report
        raise
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        from fitscale.diskspace import describe

        error = describe(error) or error  # a full disk, however wrapped: one line naming the path and fix
        user_error = isinstance(error, USER_ERRORS)
        if in_launched_rank():  # the launcher reports the first failing rank's error, once
            record_failure(error, user_error)
            # Leave at once: the teardown of a half-failed process group (its threads still waiting on
            # peers) can abort with a C++ message of its own, a second line the launcher cannot hide.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2 if user_error else 1)
        if os.environ.get("FITSCALE_DEBUG"):
            raise
        if not user_error:  # a bug: its traceback, and how to report it
            traceback.print_exception(type(error), error, error.__traceback__)
            print(BUG_NOTE.format(command=args.command), file=sys.stderr)
            return 1
        print(f"fitscale {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    # `python -m fitscale.cli` (how launched ranks run): run the imported module's main, so that one
    # copy of the dispatcher exists in the process (not `__main__` beside `fitscale.cli`).
    from fitscale.cli import main as entry_point

    sys.exit(entry_point())
