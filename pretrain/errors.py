"""Errors of the trainer and the export a user can fix; printed by the CLI as one line with a non-zero exit."""
from lmforge_common import UserError

__all__ = ["UserError", "ConfigError", "ConsistencyError", "DistributedError", "ExportError", "HubError"]


class ConfigError(UserError):
    """A config key has a bad value; the message names each key and its allowed values."""


class ConsistencyError(UserError):
    """Tokenizer, model and data disagree (vocabulary, special ids, seq_len, fingerprint, objective)."""


class DistributedError(UserError):
    """The launcher's environment does not describe a usable world (rank, world size, rendezvous)."""


class ExportError(UserError):
    """A checkpoint cannot be exported, or the export does not reproduce the trained model."""


class HubError(UserError):
    """Pushing an export to the Hugging Face Hub failed; the local export is left as it is."""
