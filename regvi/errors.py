"""User-facing error types.

Library code raises these; only the CLI turns them into a one-line message and an exit code.
Every message names the offending thing (file, column, key, category) and, where possible,
says what to do about it.
"""

from __future__ import annotations


class RegviError(Exception):
    """Base class for errors caused by user input or configuration (not by a bug)."""


class ConfigError(RegviError):
    """The composed configuration is invalid (unknown key, wrong type, bad value)."""


class DataError(RegviError):
    """The input data cannot be used (missing file, bad counts, missing obs column...)."""


class NonFiniteLossError(RegviError):
    """Training produced a non-finite loss."""


#: Exit code of a run stopped by a pre-emption signal (SIGUSR2, SIGTERM) after writing its
#: checkpoint; regvi's LSF launcher asks LSF to requeue elements that exit with it (``-Q``).
REQUEUE_EXIT_CODE = 99


class Preempted(RegviError):
    """Training stopped on a pre-emption signal after writing its checkpoint (see
    :mod:`regvi.train.preemption`); the CLI exits with :data:`REQUEUE_EXIT_CODE`."""

    exit_code = REQUEUE_EXIT_CODE
