"""The one type of user error: bad input, diagnosed, with a one-line message saying what to change.

`UserError` is a `ValueError`, so callers that catch ValueError keep working. Every place that
diagnoses bad input (a config field, a command-line flag, a file that is not what it should be)
raises it or a subclass (`fitscale.config.errors.ConfigError`); the command line prints it as one
line with exit status 2. Any other exception, a plain ValueError from a bug in our code or in torch
included, is a bug: the command line prints its traceback (fitscale/clitools.py, `USER_ERRORS`).
This module is on the ground floor: it imports nothing, and every layer may raise it.
"""


class UserError(ValueError):
    """Bad input, diagnosed: the message is one line naming the file, field or flag, the value, and the fix."""
