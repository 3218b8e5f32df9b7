"""The one error type for configuration problems."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what to set instead."""
