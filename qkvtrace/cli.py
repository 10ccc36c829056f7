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

@cli.command()
@click.argument("spec", default="builtin")
@click.option("--src-lang", default="en", show_default=True, help="Source language: JSONL key or file suffix.")
@click.option("--tgt-lang", default="de", show_default=True, help="Target language: JSONL key or file suffix.")
@click.option("--seed", default=0, show_default=True, help="Seed of the validation split.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every pair (train, val, test) to this TSV file.")
@click.option("--force", is_flag=True, help="Overwrite the --export file if it exists.")
def corpus(spec, src_lang, tgt_lang, seed, export_path, force):
    """Show a corpus: split sizes, vocabulary sizes, categories and samples.

    SPEC is `builtin`, a .tsv/.jsonl file or a directory with train.en/train.de (val.*, test.* optional).
    TSV columns are taken as given: column 1 is the source.

    Example:

    \b
        qkvtrace corpus builtin
        qkvtrace corpus data/multi30k --src-lang de --tgt-lang en
        qkvtrace corpus pairs.jsonl --export pairs.tsv
    """
    from qkvtrace.corpus import export_tsv, load_corpus
    from qkvtrace.vocab import tokenize

    c = load_corpus(spec, src_lang=src_lang, tgt_lang=tgt_lang, seed=seed)
    info = c.describe()
    pairs = c.train + c.val + c.test
    click.echo(f"corpus    {info['name']} ({c.src_lang} -> {c.tgt_lang}), sha256 {info['content_hash'][:12]}")
    click.echo("pairs     " + ", ".join(f"{split} {n}" for split, n in info["sizes"].items()))
    src_vocab = {t for p in pairs for t in tokenize(p.src)}
    tgt_vocab = {t for p in pairs for t in tokenize(p.tgt)}
    click.echo(f"vocab     {c.src_lang} {len(src_vocab)} words, {c.tgt_lang} {len(tgt_vocab)} words")
    if "categories" in info:
        click.echo("category  " + ", ".join(f"{k} {n}" for k, n in info["categories"].items()))
    click.echo("samples")
    for i in range(min(5, len(c.train))):
        p = c.train[i * len(c.train) // min(5, len(c.train))]
        click.echo(f"  {p.src}  ->  {p.tgt}")
    if export_path:
        n = export_tsv(c, export_path, force=force)
        click.echo(f"wrote {n} pairs to {export_path}")


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
