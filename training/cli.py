"""The process edge of main.py and checkpoint_tool.py: every way a run ends becomes an exit code and at most one
message, never a hang.

Errors the user can fix print ``error: ...`` (exit 1) without a traceback; a signalled stop exits with 128 + the
signal number (training/interrupts.py). The exception is dropped before the process exits: its traceback holds
the training loop's DataLoader iterator, whose worker processes ignore SIGTERM (so that a scheduler's SIGTERM to
every process cannot kill them mid-epoch); left alive until interpreter exit, multiprocessing would wait on them
forever. Freed here, the iterator asks its workers to shut down; any still running after that are killed.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

from training import process, recipes
from training.interrupts import Interrupted
from training.run_dir import error_message, last_checkpoint


def start(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> NoReturn:
    """A program's ``__main__``: parse (with the dataset's recipe), ``run``, leave the process group, exit."""
    args = recipes.parse_args(parser, sys.argv[1:])
    try:
        exit_code = run(main, args)
    finally:
        process.shutdown()
    raise SystemExit(exit_code)


def run(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``main(args)``; returns the process exit code after printing what the user needs to know."""
    try:
        main(args)
        return 0
    except Interrupted as stop:
        code = stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        output_dir = Path(args.output_dir) if args.output_dir else None
        print(f"error: interrupted again, stopped at once without a checkpoint; {last_checkpoint(output_dir)}",
              file=sys.stderr)
        code = 130
    except (ValueError, OSError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        code = 1
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # a bug: show where, then exit instead of hanging on the loader's workers
        traceback.print_exc()
        code = 1
    gc.collect()  # the traceback's frames form reference cycles; collecting them frees the iterator now
    for worker in multiprocessing.active_children():  # a loader worker that did not take the shutdown request
        worker.kill()
        worker.join()
    return code
