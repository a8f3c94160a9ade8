"""Errors of the trainer a user can fix; printed by the CLI as one line with a non-zero exit."""
from data_prep.errors import UserError


class ConfigError(UserError):
    """A config key has a bad value; the message names each key and its allowed values."""


class ConsistencyError(UserError):
    """Tokenizer, model and data disagree (vocabulary, special ids, seq_len, fingerprint, objective)."""
