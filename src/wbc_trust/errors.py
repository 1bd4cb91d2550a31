"""The one exception type a user sees: it names the problem and the fix, and the CLI prints it on one line."""


class WbcError(Exception):
    """A problem with the user's input (data, model file, arguments) rather than a bug.

    The CLI turns it into a one-line message and exit code 2, with no traceback.
    """
