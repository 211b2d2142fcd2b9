"""Errors that the command line shows as one line, without a traceback."""


class UserInputError(ValueError):
    """Invalid input from the user: a file, a column, a value or an option.

    The message names what was wrong, what was expected and what to do, on one line.
    """
