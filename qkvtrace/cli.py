"""The command line: Click only. Each command parses, makes one API call and echoes.

Heavy libraries (torch, umap, matplotlib, sklearn) are imported inside the commands so that `--help` is fast.
`main()` turns a QkvtraceError into one line `error: ...` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import sys

import click

from qkvtrace.errors import QkvtraceError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qkvtrace")
def cli():
    """Train a translation Transformer and trace its Q, K, V vectors across checkpoints.

    Example:

        qkvtrace study            # the word-context clustering study, from nothing
    """


def parse_int_list(value: str, option: str) -> list[int]:
    """'1,15,30' -> [1, 15, 30]; anything else is a one-line error naming the option."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise QkvtraceError(f"{option} {value!r}: expected comma-separated whole numbers, e.g. 1,15,30") from None
    if not items:
        raise QkvtraceError(f"{option} {value!r}: expected comma-separated whole numbers, e.g. 1,15,30")
    return items


# --- corpus commands ---

# --- train commands ---

# --- extract commands ---

# --- plot commands ---

# --- experiment commands ---

# --- bench commands ---


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `qkvtrace` console script."""
    try:
        cli.main(args=argv, prog_name="qkvtrace", standalone_mode=False)
    except QkvtraceError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
