"""The failures a run can end with, one class each, so the CLI can print one line and pick the exit code.

User mistakes (a bad config, data file or checkpoint) have their own classes beside the code that
finds them (`ConfigError`, `DataError`, ...); these are the ones found while the cluster runs.
"""

from __future__ import annotations


class PlacementError(RuntimeError):
    """The roles or Ray Train workers cannot be placed on this cluster (or cannot share a device as
    asked); the message names the role and the missing resource. Raised before anything starts."""


class PhaseTimeout(RuntimeError):
    """A remote call or collective did not finish in time; names the role and the phase."""


class RoleFailure(RuntimeError):
    """An actor died (`died`) or raised; names the role and the phase."""

    def __init__(self, message: str, died: bool = False, cause: BaseException | None = None):
        super().__init__(message)
        self.died, self.cause = died, cause  # cause: the exception the remote call raised
