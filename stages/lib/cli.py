"""Command-line wrapper shared by every stage: one readable error line and an exit code.

Exit codes: 0 success, 2 bad input or params (`UserError`), 1 any other failure.
The last line on stderr is the message; `--debug` or `SSL_DEBUG=1` adds the traceback.
"""
import argparse
import os
import signal
import sys
import threading
import traceback


class UserError(Exception):
    """Bad params, data or files: the user can fix it (exit code 2)."""


class StageError(Exception):
    """A failure during the work itself, with a clear message (exit code 1)."""


def log(message):
    """Progress and status lines go to stderr, so stdout stays clean; under torchrun, rank 0's only."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def run_stage(name, description, add_arguments, run, argv=None):
    """Parse arguments, call `run(args)`, and turn exceptions into one line and an exit code.
    `name` is the stage's name in messages; the usage line names the module that defines `run`."""
    parser = argparse.ArgumentParser(prog=f"python -m {_module_name(run)}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (DVC's params.yaml)")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SSL_DEBUG", "") not in ("", "0")
    previous = _interrupt_on_signals()
    try:
        run(args)
    except UserError as error:
        _fail(2, f"error: {error}", debug)
    except StageError as error:
        _fail(1, f"error: {error}", debug)
    except KeyboardInterrupt as error:
        _fail(1, f"error: {name} interrupted by {error.args[0] if error.args else 'SIGINT'}; run it again", debug)
    except Exception as error:  # noqa: BLE001 - the single place that reports unexpected failures
        _fail(1, f"error: {name} failed: {type(error).__name__}: {error}", debug)
    finally:
        _restore(previous)


def _module_name(run):
    """The dotted name of the module that defines `run`, also under `python -m`, where it is __main__."""
    spec = getattr(sys.modules.get(run.__module__), "__spec__", None)
    return spec.name if spec else run.__module__  # no spec: a script or `python -c`


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupt_on_signals():
    """SIGINT and SIGTERM raise KeyboardInterrupt, so cleanup code (temporaries) runs before exit.

    Training loops replace these handlers with their own, which save a checkpoint first.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return {}
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _fail(code, message, debug):
    if debug:
        traceback.print_exc()
    print(message.replace("\n", " "), file=sys.stderr, flush=True)
    sys.exit(code)
