"""Errors that the command line turns into one line and exit code 2.

Library code raises these for anything a user can fix (a bad flag, a missing data
directory, an unsafe DP configuration). The message must say what is wrong and what to
do instead; the CLI prints it as ``error: <message>`` with no traceback.
"""


class ConfigError(ValueError):
    """A configuration the user asked for is invalid or unsafe."""


class DataError(ConfigError):
    """Data could not be found or read."""


class PrivacyError(ConfigError):
    """A configuration whose privacy guarantee would not hold (refused, with the reason)."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient."""
