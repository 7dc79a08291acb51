"""The library's one exception type."""


class MagicEduError(ValueError):
    """Bad input to magic_edu: the message names the argument and what is allowed."""
