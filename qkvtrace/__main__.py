"""`python -m qkvtrace` runs the command line."""

from qkvtrace.cli import console

console()
