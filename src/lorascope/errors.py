"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class LorascopeError(Exception):
    """A user-facing failure: bad params, a missing or malformed input file, a failed validation.

    The message is one line that names the file or key and what was expected; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback unless ``--debug`` is given.
    """
