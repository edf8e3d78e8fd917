"""The one exception type for bad user input (recipe, data, model path).

The CLI prints these as a single line and exits with status 2, without a traceback: they describe what the user
must change, not a bug.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file, the row or key, and what was expected."""
