"""Exceptions that carry a message meant for the person running edgeface.

The CLI prints these without a traceback, so each message must name the value that is wrong
and say how to fix it.
"""


class EdgefaceError(Exception):
    """Base class for errors reported to the user without a traceback."""


class ConfigError(EdgefaceError):
    """Invalid configuration file or command-line override."""


class DataError(EdgefaceError):
    """Missing, unreadable or unusable dataset."""


class PartitionError(EdgefaceError):
    """Partition request that cannot be satisfied by the dataset."""


class QuorumError(EdgefaceError):
    """Too few edge nodes reported a usable update in a round."""


class ExportError(EdgefaceError):
    """ONNX export or parity check failed."""


class RegistryError(EdgefaceError):
    """MLflow model registry request that cannot be carried out."""


class LockTimeoutError(RegistryError):
    """Registry lock still held by another client when the wait timed out.

    The condition is transient, so the CLI exits with `EXIT_TEMPFAIL` and a script can retry.
    """


# Exit status of the CLI for a failure worth retrying, EX_TEMPFAIL of BSD's <sysexits.h>.
EXIT_TEMPFAIL = 75
