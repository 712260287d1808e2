"""The one exception type the CLI turns into a clean, one-line error."""


class RepskipError(Exception):
    """A problem with the user's input or environment, with a message that says the fix.

    The CLI prints ``error: <message>`` and exits non-zero without a traceback. Anything else
    that escapes is a bug in repskip and keeps its traceback.
    """
