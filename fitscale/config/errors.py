"""The one error type for configuration problems: a UserError (fitscale/errors.py), so the command
line prints it as one line."""

from fitscale.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong; the message names the field and what to set instead."""
