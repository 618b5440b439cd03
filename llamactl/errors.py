"""The one exception type for mistakes a user can make: the CLI prints it as `error: <what> (<where>)`."""


class LlamactlError(Exception):
    """A user-facing error; its message names what is wrong and where (file, flag, step)."""
