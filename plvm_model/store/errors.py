"""The project's exceptions: one hierarchy under :class:`PlvmError`, each class with its exit code.

The ``plvm`` command catches :class:`PlvmError` and prints its one-line message with
``exit_code``; anything else is a bug and keeps its traceback. The exit-code table of docs/cli.md
is checked against :data:`EXIT_CODES` by a test.
"""

from __future__ import annotations


class PlvmError(Exception):
    """Something the user can act on; the message says what and where."""

    exit_code = 2


class ConfigError(PlvmError, ValueError):
    """A config that cannot be used: unknown key, wrong type, missing file, unset variable."""


class InputError(PlvmError, ValueError):
    """Input that cannot be listed or used as a whole: no input given, an unreadable manifest, a bad name."""


class InputNotFound(PlvmError, FileNotFoundError):
    """An input, manifest or model path that does not exist."""


class BankError(PlvmError, ValueError):
    """A bank that cannot be used: unreadable, damaged or changed (checksums, non-finite vectors, shapes), of another
    schema or another model, or changed by other enrollments each time this one tried to commit."""


class IndexCorrupt(PlvmError, ValueError):
    """A part of the face index that cannot be read whole (damaged, cut short, of another schema): the message
    names it; ``plvm index check`` lists every such part and ``plvm caption --rebuild-index`` drops them."""


class OutputExists(PlvmError, ValueError):
    """The output already holds committed rows, and the run was not told to resume, retry or overwrite."""


class OutputLocked(PlvmError, RuntimeError):
    """Another run (or repair) holds the output's lease; the message names it."""


class OutputUnwritable(PlvmError, OSError):
    """The output cannot be written (a file in the folder's place, no write rights, a missing bucket): found at
    the start of a run, before any work."""


class ResourcesUnavailable(PlvmError, ValueError):
    """A stage asks for more CPUs or GPUs per actor or task than any node of the Ray cluster has or could have."""


class RunFailed(PlvmError, RuntimeError):
    """The system failed (a stage's bug, a dead or stuck engine) beyond the run's failure budget."""

    exit_code = 3


class EngineDead(RunFailed):
    """The generation engine stopped working: the run stops rather than marking every photo."""


class LeaseLost(RunFailed):
    """Another process took over the lease of the output this run was writing: the run stops."""


class RowCountMismatch(PlvmError, RuntimeError):
    """The output does not hold each listed photo exactly once after a run."""

    exit_code = 4


INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (SIGINT), as shells report one: 128 + 2."""

EXIT_CODES: dict[int, str] = {
    0: "success: every listed photo has exactly one row (input faults are rows with an error)",
    1: "a bug: an unexpected exception, printed with its traceback",
    2: "bad usage, config, input, bank, a damaged face index part, an output that already holds rows, that another run is writing or that "
    "cannot be written, or resources no Ray node has (ConfigError, InputError, InputNotFound, BankError, "
    "IndexCorrupt, OutputExists, OutputLocked, OutputUnwritable, ResourcesUnavailable); found at the start, before any work",
    3: "the run failed: system failures past `run.max_failed_fraction`, a stage that failed after its "
    "retries, a dead engine, or a lease taken over by another run (RunFailed, EngineDead, LeaseLost); the "
    "summary names the stage and the first error",
    4: "the output does not hold each listed photo exactly once (RowCountMismatch)",
    INTERRUPTED: "interrupted by Ctrl-C (SIGINT); Ray stopped, what the run committed stays (`--resume` goes on)",
}
"""What each exit code of ``plvm`` means."""
