"""The errors vl2edge raises for user mistakes: each carries a message a person can act on.

Every user-facing entry point (CLI, server) turns a `VL2Error` into that message and an exit code or
HTTP status; anything else is a bug and keeps its traceback.
"""


class VL2Error(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug. `param`: the field
    it is about, where there is one (the server reports it as OpenAI's `error.param`)."""

    exit_code = 2

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(VL2Error, ValueError):
    """A config.json / processor_config.json that is missing, malformed or not supported."""


class CheckpointError(VL2Error):
    """Weights that are missing, truncated, corrupt, or do not match the config."""


class InputError(VL2Error, ValueError):
    """A bad request: unreadable image, placeholder/image count mismatch, prompt too long, ..."""
