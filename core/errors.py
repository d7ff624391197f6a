"""Errors meant for users: the message names the setting, its value and the fix."""


class ConfigError(ValueError):
    """A setting is wrong. Raised before any work starts; the launcher prints it as one line."""
