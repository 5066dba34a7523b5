"""User-facing errors: the CLI prints the message (no traceback) and exits non-zero."""


class LmforgeError(Exception):
    """A problem with the user's input or environment, explained in the message.

    The message names the file, line and key where it applies, so the user can fix it
    without reading a traceback.
    """
