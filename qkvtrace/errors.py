"""The one exception type that reaches the user as a one-line message.

Library code raises `QkvtraceError` for anything the user can fix (a bad file, option or value); `cli.py` prints
its message as `error: ...` and exits 2 without a traceback. Anything else is a bug and keeps its traceback.

The library speaks in parameters, the command line in options: an error about a value passes the *parameter* it
came in (`QkvtraceError("'x': unknown; valid: q, k", param="kinds")` reads "kinds 'x': unknown; ..."), and
`cli.py` names the option the user typed instead ("--kinds 'x': ..."), as Click's `BadParameter` does.

A message may also point at other parameters, in the remedy it suggests: each is a `{name}` placeholder in the
message, listed in `mentions`. A mention is the parameter's name, optionally followed by how a Python caller passes
it: `QkvtraceError("D: already exists; pass {force} to replace it", param="out", mentions=("force=True",))` reads
"out D: already exists; pass force=True to replace it" from Python, and "--out D: ...; pass --force to replace it"
from the command line. A parameter that takes a value is named bare and the message carries the value
("use {precision} bf16 or fp32", `mentions=("precision",)`: "use precision bf16 or fp32", "use --precision bf16 or
fp32"). Only the listed placeholders are replaced, so a message may hold other braces (a TOML or JSON snippet).
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
    mentions : tuple of str, optional
        Other parameters the message names as `{name}` placeholders, each "name" or "name=VALUE" (how Python
        passes it, e.g. "force=True"); the CLI spells each as its option (`cli.option_for`).
    """

    def __init__(self, message: str, param: str | tuple[str, ...] | None = None, mentions: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.param = param
        self.mentions = tuple(mentions)
        self.option: str | None = None  # set by the CLI: how the user spelled `param` (e.g. "--kinds")
        self.spelled: dict[str, str] = {}  # set by the CLI: mentioned parameter -> its option (e.g. "--force")

    def mentioned(self) -> list[str]:
        """The names of the parameters in `mentions` ("force=True" -> "force")."""
        return [m.partition("=")[0] for m in self.mentions]

    def text(self) -> str:
        """The message with each mentioned parameter filled in: its option where the CLI set one, else as Python
        passes it."""
        message = self.message
        for mention, name in zip(self.mentions, self.mentioned()):
            message = message.replace("{" + name + "}", self.spelled.get(name) or mention)
        return message

    def __str__(self) -> str:
        name = self.option or (" and ".join(self.param) if isinstance(self.param, tuple) else self.param)
        message = self.text()
        if not name:
            return message
        return f"{name}{'' if message.startswith((':', ' ')) else ' '}{message}"


def closest(word: str, choices, n: int = 5) -> list[str]:
    """Up to `n` entries of `choices` closest to `word` (difflib ratio), best first."""
    import difflib

    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.0)
