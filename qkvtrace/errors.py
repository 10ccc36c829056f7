"""The one exception type that reaches the user as a one-line message.

Library code raises `QkvtraceError` for anything the user can fix (a bad file, option or value); `cli.py` prints
its message as `error: ...` and exits non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""


class QkvtraceError(Exception):
    """A problem with the user's input, stated in one line that names the file, option or value and what is right."""


def closest(word: str, choices, n: int = 5) -> list[str]:
    """Up to `n` entries of `choices` closest to `word` (difflib ratio), best first."""
    import difflib

    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.0)
