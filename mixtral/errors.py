"""The kinds of mistakes a user can make, one exception type each.

Every message names the file, key, field or limit at fault, so the CLI can print it as one line
and exit non-zero without a traceback.
"""
from __future__ import annotations


class MixtralError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ConfigError(MixtralError):
    """An unknown preset, or a config file whose fields are missing or inconsistent."""


class CheckpointError(MixtralError):
    """A checkpoint that is missing, truncated, or disagrees with its config (missing tensor, wrong shape)."""


class TokenizerError(MixtralError):
    """No tokenizer where one was asked for, or a tokenizer file that cannot be read."""


class ContextLengthError(MixtralError):
    """A prompt (plus the tokens asked for) that does not fit in the model's context."""


class InputError(MixtralError):
    """Arguments that cannot work: an empty prompt, a token id outside the vocabulary, a bad sampling setting."""
