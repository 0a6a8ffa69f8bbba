"""The library's exceptions. Only cli.py turns them into messages and exit codes.

Every message is one line that names the input it is about (a file, a URL, a database).
"""


class RetrievalError(Exception):
    """Base class: an input the library cannot use. ``str(exc)`` is the one-line message."""


class WeightsError(RetrievalError):
    """A weights file that cannot be used: missing, truncated, wrong keys or shapes, unknown format."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsUnavailableError(RetrievalError):
    """No weights were found and they could not (or may not) be downloaded."""


class DownloadError(RetrievalError):
    """A download failed: HTTP error, connection error, checksum mismatch."""


class ImageError(RetrievalError):
    """An image that cannot be decoded or preprocessed. ``reason`` is a short machine-readable tag."""

    def __init__(self, source, problem: str, reason: str = "undecodable"):
        self.source = str(source)
        self.problem = problem
        self.reason = reason
        super().__init__(f"{self.source}: {problem}")


class ConfigError(RetrievalError):
    """An option value that makes no sense (unknown preprocessing, bad batch size, ...)."""


class DatabaseError(RetrievalError):
    """A gallery database that cannot be used as asked (newer schema, different model, corrupt)."""


class ModelMismatchError(DatabaseError):
    """The database was built with another model than the one given."""


class InputError(RetrievalError):
    """A CSV file, folder or other input that cannot be read at all."""
