"""The plvm command: enroll people, caption photos and keep the archive, suggest and correct people, forget a
person, build datasets, evaluate, report.

Each group of commands is a module (``enroll``, ``archive``, ``people``, ``dataset``, ``evaluate``) that declares its
commands and runs them; ``common`` holds what they share. Exit codes: see ``plvm_model.store.errors.EXIT_CODES``
(and docs/cli.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn

from pipelines.cli import archive, dataset, enroll, evaluate, people
from plvm_model.store.errors import INTERRUPTED, PlvmError


def parser() -> argparse.ArgumentParser:
    """Every ``plvm`` command, each declared by the module of its group."""
    p = argparse.ArgumentParser(prog="plvm", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (enroll, archive, dataset, evaluate, people):
        group.add(sub)
    return p


def run(argv: list[str] | None = None) -> int:
    """Run one ``plvm`` command line in this process and return its exit code (``plvm_model.store.errors.EXIT_CODES``).

    A :class:`PlvmError` is printed as one line; anything else (a bug, Ctrl-C) propagates.
    """
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, as a dataset's card records it
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except PlvmError as error:  # the user's to act on: one message; anything else is a bug and keeps its traceback
        print(f"plvm {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``plvm`` program: :func:`run`, then Ray shut down, the output flushed, and the process ended at once.

    The process ends with ``os._exit``, without the interpreter's teardown, in which native thread pools
    still alive (pyarrow's, after reading Parquet: apache/arrow#34314) are destroyed while running and
    abort the process (``terminate called without an active exception``, exit 134) after its work is
    done, now and then. What that teardown would still do is done here first: Ray shut down (the Ray
    this process started stops with it), logs and standard streams flushed. A bug prints its traceback
    and exits 1; argparse's usage errors exit 2; Ctrl-C exits :data:`INTERRUPTED`.
    """
    try:
        code = run(argv)
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except KeyboardInterrupt:
        print("plvm: interrupted", file=sys.stderr)
        code = INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: its traceback, as the interpreter would print it
        traceback.print_exc()
        code = 1
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

