"""Autograd Functions, torch.library ops and the single backend dispatch point."""

from lowrank.ops import nf4  # noqa: F401  (registers the 4-bit ops)
from lowrank.ops._dispatch import BackendUnavailableError, resolve, usable_backends

__all__ = ["BackendUnavailableError", "resolve", "usable_backends"]
