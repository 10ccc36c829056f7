"""The one exception type that reaches the user as a one-line message.

Library code raises `QkvtraceError` for anything the user can fix (a bad file, option or value); `cli.py` prints
its message as `error: ...` and exits 2 without a traceback. Anything else is a bug and keeps its traceback.

The library speaks in parameters, the command line in options: an error about a value passes the *parameter* it
came in (`QkvtraceError("'x': unknown; valid: q, k", param="kinds")` reads "kinds 'x': unknown; ..."), and
`cli.py` names the option the user typed instead ("--kinds 'x': ..."), as Click's `BadParameter` does.
"""

from __future__ import annotations


class QkvtraceError(Exception):
    """A problem with the user's input, stated in one line that names the file, parameter or value and what is right.

    Parameters
    ----------
    message : str
        The line; with `param`, the text after the parameter's name (e.g. "'x': unknown; valid: q, k").
    param : str or tuple of str, optional
        The library parameter the bad value came in; the CLI replaces it by its option (`cli.option_for`). A tuple
        names parameters that are wrong together (("resume", "force"): "resume and force contradict ...").
    """

    def __init__(self, message: str, param: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.option: str | None = None  # set by the CLI: how the user spelled `param` (e.g. "--kinds")

    def __str__(self) -> str:
        name = self.option or (" and ".join(self.param) if isinstance(self.param, tuple) else self.param)
        if not name:
            return self.message
        return f"{name}{'' if self.message.startswith((':', ' ')) else ' '}{self.message}"


def closest(word: str, choices, n: int = 5) -> list[str]:
    """Up to `n` entries of `choices` closest to `word` (difflib ratio), best first."""
    import difflib

    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.0)
