"""The project's error types: every bad input, file or artifact ends in one of these, with a message naming it.

They subclass the built-in type a caller would catch anyway (ValueError, OSError, RuntimeError), so
``except ValueError`` keeps working; ``except ZeroPurError`` catches every refusal of this project. Other
modules define narrower ones on top (``engine_record.EngineMismatchError``, ``onnx_export.ExportError``).
"""
from __future__ import annotations


class ZeroPurError(Exception):
    """Base of every error zeropur-rt raises on purpose (bad input, bad file, bad artifact)."""


class ArtifactError(ZeroPurError, ValueError):
    """An artifact directory that is missing, tampered with, or built for something else."""


class ConfigError(ZeroPurError, ValueError):
    """A ZeroPur config, config file or ``--set`` override that is not valid."""


class InputError(ZeroPurError, ValueError):
    """Images (or labels) that the purifier cannot take: wrong type, shape, dtype, range, batch size."""


class OutputError(ZeroPurError, OSError):
    """An output file that could not be written (disk full, file-size limit, permissions); nothing was left."""


class MissingFileError(ZeroPurError, FileNotFoundError):
    """A data or weights file found in none of the places looked; the message lists them and the fix."""


class DownloadError(ZeroPurError, OSError):
    """A download that failed or did not match its recorded hash; nothing loadable was left behind."""
