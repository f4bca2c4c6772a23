"""One exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a folder). The message names what and what to do."""
