"""The errors megatron-capaware raises for a user's mistake: one base class, one module.

Every user-facing error (a bad router setting, a plan or calibration file for
another model, NaN router scores, a bad checkpoint path, ...) derives from
:class:`CapawareError`; its message says what is wrong and how to fix it. The
command-line entry points catch this base only (``_compat.cli``): anything
else is a bug and keeps its traceback. Each class also derives from the
built-in type callers caught before (``ValueError``, ``ImportError``), so
existing ``except ValueError`` code keeps working.

This module imports nothing from the package (every module may import it).
"""

from __future__ import annotations


class CapawareError(Exception):
    """Base of every user-facing megatron-capaware error."""


class CapawareConfigError(CapawareError, ValueError):
    """An invalid router configuration; the message says what is wrong and how to fix it."""


class RoutingInputError(CapawareError, ValueError):
    """Router inputs a policy cannot route (bad shapes, NaN / Inf or negative scores, pool < k...)."""


class PlacementError(CapawareError, ValueError):
    """A placement plan that cannot be made or applied (another model, bad sizes, ranks disagree)."""


class CheckpointError(CapawareError, ValueError):
    """A checkpoint that cannot be read into the model (missing, another model, bad parallel sizes)."""


class TokenizerError(CapawareError, ValueError):
    """A tokenizer or text file that cannot be read."""


class ConversionError(CapawareError, ValueError):
    """A Hugging Face checkpoint that cannot be converted (unsupported architecture or layout)."""


class UserInputError(CapawareError, ValueError):
    """A mistake in what the user gave on the command line (a path, a size, a file's contents)."""


class MegatronTrainingUnavailable(CapawareError, ImportError):
    """``megatron.training`` (Megatron-LM's argument parser) is not importable in this environment."""


class RoutingCollectiveError(RuntimeError):
    """A routing collective failed on this rank: another rank of the group crashed, hung or raised.

    A fault, not the user's mistake, so not a :class:`CapawareError`: the launcher reports it with
    every rank's traceback (the other rank's log has the cause).
    """


__all__ = [
    "CapawareConfigError",
    "CapawareError",
    "CheckpointError",
    "ConversionError",
    "MegatronTrainingUnavailable",
    "PlacementError",
    "RoutingCollectiveError",
    "RoutingInputError",
    "TokenizerError",
    "UserInputError",
]
