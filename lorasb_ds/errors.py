"""The error every check raises: the command line turns it into one line on stderr and exit status 2."""


class ConfigError(ValueError):
    """A run or DeepSpeed configuration that cannot work; the message names the field and the fix."""
