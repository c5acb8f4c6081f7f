"""User-facing errors: the CLI prints their message as one line and exits non-zero, with no traceback."""


class HnmixError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class CorruptImageError(HnmixError):
    """An image file that PIL cannot decode.

    DataLoader workers re-raise exceptions as ``type(msg)`` where ``msg`` embeds the worker's traceback;
    keep only the original one-line message so the CLI can still print a single clear line.
    """

    def __init__(self, message: str):
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else str(message)
        super().__init__(last.split("CorruptImageError: ", 1)[-1])
