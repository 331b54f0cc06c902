"""Command-line wrapper shared by every stage: one readable error line and an exit code.

Exit codes: 0 success, 2 bad input or params (`UserError`), 1 any other failure.
The last line on stderr is the message; `--debug` or `SSL_DEBUG=1` adds the traceback.
"""
import argparse
import os
import sys
import traceback


class UserError(Exception):
    """Bad params, data or files: the user can fix it (exit code 2)."""


class StageError(Exception):
    """A failure during the work itself, with a clear message (exit code 1)."""


def log(message):
    """Progress and status lines go to stderr, so stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def run_stage(name, description, add_arguments, run, argv=None):
    """Parse arguments, call `run(args)`, and turn exceptions into one line and an exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SSL_DEBUG", "") not in ("", "0")
    try:
        run(args)
    except UserError as error:
        _fail(2, f"error: {error}", debug)
    except StageError as error:
        _fail(1, f"error: {error}", debug)
    except KeyboardInterrupt:
        _fail(1, f"error: {name} interrupted", debug)
    except Exception as error:  # noqa: BLE001 - the single place that reports unexpected failures
        _fail(1, f"error: {name} failed: {type(error).__name__}: {error}", debug)


def _fail(code, message, debug):
    if debug:
        traceback.print_exc()
    print(message.replace("\n", " "), file=sys.stderr, flush=True)
    sys.exit(code)
