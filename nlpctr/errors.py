"""The one exception type for a user's mistake: the CLI prints it on one line, no traceback."""


class UserError(Exception):
    """Bad input, a wrong spec or a missing prerequisite; the message names the fix."""
