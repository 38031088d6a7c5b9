"""Typed user errors: what the scripts report as one clean message (exit code 2), never a traceback.

Every problem a user can cause or fix — a config typo, a missing or malformed file, a model file
that is not ours, a disk that is full — is raised as a subclass of :class:`UserError` whose message
names the file (and line, id or key) and says what to do. ``pneumoseg.cli.run`` turns it into one
logged line and exit code 2; any other exception is a bug and keeps its traceback.

Each class also derives from the builtin that callers and older code catch (``ValueError``,
``FileNotFoundError`` ...), so ``except ValueError`` keeps working around library calls.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error the user can fix; the message is shown as is (no traceback)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """Unknown key, wrong type, out-of-range value or malformed override in a config."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry (architecture, encoder, optimizer ...); lists the valid."""

    __str__ = Exception.__str__  # KeyError would quote the whole message


class DownloadError(UserError, RuntimeError):
    """Pretrained weights that cannot be downloaded (offline machine): says what to fetch where."""


class DataError(UserError, ValueError):
    """An input data file (image, CSV, RLE, manifest) that cannot be used as it is."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the step needs does not exist (the message says which step makes it)."""


class FoldsError(UserError, ValueError):
    """A folds file or a fold number that does not fit the data or the config."""


class CacheError(UserError, RuntimeError):
    """A preprocessing cache that is missing, incomplete, damaged or built from other settings."""


class DiskSpaceError(CacheError):
    """Not enough free disk space for what a step is about to write (both numbers in the text)."""


class ModelFileError(UserError, ValueError):
    """A checkpoint / model.pt that is empty, truncated, not ours, unsafe, or for another model."""


class SubmissionError(UserError, ValueError):
    """A submission or sample submission that is unreadable or invalid."""


class OutputExistsError(UserError, FileExistsError):
    """An output that would be overwritten without ``--force`` (nothing good is lost silently)."""


class ResumeError(UserError):
    """``--resume`` of a run whose settings changed, or that has nothing to resume from."""


class TrainingDivergedError(UserError, ArithmeticError):
    """Training produced non-finite losses, gradients or weights: the run stops, nothing of it is
    saved (the message says the epoch, the learning rate and what to change)."""


class RunLockedError(UserError, BlockingIOError):
    """Another process is writing the same outputs (a fold folder, a tuning, a submission): the
    message names the folder and that process."""


class StaleTuningError(UserError, ValueError):
    """A tuned ``postprocess.yaml`` made for other models or settings than the ones about to use
    it (the message lists what differs and the command that re-tunes)."""


class PartialFailure(UserError):
    """Some items failed while the others were written (the message lists the failed ones)."""

    exit_code = 1
