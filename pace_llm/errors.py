"""The one exception type for bad user input: the CLI prints it and exits with code 2."""


class UserError(Exception):
    """A problem in the user's recipe, data or paths. Printed without a traceback, exit code 2."""

    exit_code = 2
