"""The command line: Click only. Each command parses, makes one API call and echoes.

Heavy libraries (torch, umap, matplotlib, sklearn) are imported inside the commands so that `--help` is fast.
`main()` turns a QkvtraceError into one line `error: ...` on stderr and exit code 2, without a traceback; an error
about a library parameter (`param="layers"`) names the command's option instead (`--layers`), as Click's own
`BadParameter` does.
"""

from __future__ import annotations

import logging
import sys

import click

from qkvtrace.errors import QkvtraceError


# Seeds reach numpy and scikit-learn, which take 0..2**32-1 (torch takes more); counts of things are at least 1.
SEED = click.IntRange(0, 2**32 - 1)
COUNT = click.IntRange(min=1)
NONNEGATIVE = click.IntRange(min=0)


# Parameters naming files or folders (options and arguments); an empty value is refused before the command runs.
PATH_PARAMS = {"out", "run_dir", "vectors_dir", "corpus", "corpus_dir", "config_file", "cache", "to", "init",
               "ref", "spec", "export_path", "sentences_file"}


def option_for(command: click.Command, param: str) -> str | None:
    """How `command` spells the library parameter `param`: its option (`--max-memory` for max_memory_mb or
    `--sentences` for sentences) or its argument (`RUN_DIR`); None if the command has no such parameter."""
    dashed = "--" + param.replace("_", "-")
    for p in command.params:
        if p.name == param or dashed in getattr(p, "opts", ()):
            if isinstance(p, click.Argument):
                return p.human_readable_name
            return max(p.opts, key=len)
    return None


def option_in_any(group: click.Group, param: str) -> str | None:
    """How the first command of `group` (searched depth-first) that has the library parameter `param` spells it:
    a remedy may name another command's option ("train the run again with --force" from `translate`)."""
    for command in group.commands.values():
        found = (option_in_any(command, param) if isinstance(command, click.Group)
                 else option_for(command, param))
        if found:
            return found
    return None


class Command(click.Command):
    """A command whose QkvtraceErrors name its options, not the library's parameters."""

    def invoke(self, ctx: click.Context):
        try:
            for name in PATH_PARAMS & ctx.params.keys():  # "" would mean the current directory, or the default
                if ctx.params[name] == "":
                    raise QkvtraceError("'': empty; give a file or folder name", param=name)
            return super().invoke(ctx)
        except QkvtraceError as e:
            if e.param and e.option is None:
                names = (e.param,) if isinstance(e.param, str) else e.param
                options = [option_for(self, name) for name in names]
                if any(options):
                    e.option = " and ".join(o or name for o, name in zip(options, names))
            # The parameters a remedy mentions ("pass {force} to replace it"): this command's option, else another
            # command's (the hint may be about another command), else as Python passes it.
            for name in e.mentioned():
                if name not in e.spelled:
                    spelled = option_for(self, name) or option_in_any(ctx.find_root().command, name)
                    if spelled:
                        e.spelled[name] = spelled
            raise


class Group(click.Group):
    command_class = Command
    group_class = type  # subgroups (bench) are Groups too, and so are their commands


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qkvtrace")
def cli():
    """Train a translation Transformer and trace its Q, K, V vectors across checkpoints.

    Example:

    \b
        qkvtrace study            # the word-context clustering study, from nothing
        qkvtrace train && qkvtrace translate outputs/runs/builtin-seed0 "i can eat apple"
    """


def parse_int_list(value: str, option: str) -> list[int]:
    """'1,15,30' -> [1, 15, 30]; anything else is a one-line error naming the option."""
    try:
        # int() refuses an empty item, so "1,,3" or "1,3," is an error rather than a silent 1,3.
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise QkvtraceError(f"{option} {value!r}: expected comma-separated whole numbers, e.g. 1,15,30") from None


def parse_epochs(value: str, option: str = "--epochs") -> list[int]:
    """'1,15,30' -> [1, 15, 30]; an epoch given twice is an error (it would print the same output twice, and a
    "change" of zero)."""
    chosen = parse_int_list(value, option)
    repeated = sorted({e for e in chosen if chosen.count(e) > 1})
    if repeated:
        raise QkvtraceError(f"{option} {value}: epoch {', '.join(map(str, repeated))} given more than once; "
                            "give each epoch once")
    return chosen


def one_or_more_epochs(epoch: int | None, epochs: str | None, run=None) -> list[int | None]:
    """The checkpoints chosen with --epoch N or --epochs 1,15,30 (not both); [None] = the newest.

    An epoch given twice is an error (`parse_epochs`); with `run` each is checked to have a checkpoint, and an
    error names the option the user typed."""
    if epoch is not None and epochs is not None:
        raise QkvtraceError(f"--epoch {epoch} and --epochs {epochs}: give one of them")
    chosen = parse_epochs(epochs) if epochs is not None else [epoch]
    if run is not None:
        param = "epochs" if epochs is not None else "epoch"  # the CLI names it as the option the user typed
        chosen = [run.check_epoch(e, param) for e in chosen]
    return chosen


# --- corpus commands ---

class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to its default one: `qkvtrace corpus SPEC`
    shows SPEC, `qkvtrace corpus fetch NAME` downloads."""

    default = "show"
    command_class = Command  # its commands name their options in errors and refuse empty paths, as every other

    def parse_args(self, ctx, args):
        if args[:1] not in (["--help"], ["-h"]) and (not args or args[0] not in self.commands):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@cli.group(cls=DefaultCommandGroup)
def corpus():
    """Show a corpus (`qkvtrace corpus SPEC [--src-lang --tgt-lang --seed --export FILE --force]`, i.e.
    `corpus show`), or download one (`qkvtrace corpus fetch multi30k`).

    Example:

    \b
        qkvtrace corpus builtin
        qkvtrace corpus data/multi30k --export pairs.tsv
        qkvtrace corpus fetch multi30k --to data/multi30k
    """


@corpus.command("show")
@click.argument("spec", default="builtin")
@click.option("--src-lang", default="en", show_default=True, help="Source language: JSONL key or file suffix.")
@click.option("--tgt-lang", default="de", show_default=True, help="Target language: JSONL key or file suffix.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every pair (train, val, test) to this TSV file.")
@click.option("--force", is_flag=True, help="Overwrite the --export file if it exists.")
def corpus_show(spec, src_lang, tgt_lang, seed, export_path, force):
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
    # Exported before anything is printed: a failed write is one error line, not a description and then an error.
    n_exported = export_tsv(c, export_path, force=force) if export_path else 0
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
        click.echo(f"wrote {n_exported} pairs to {export_path}")


@corpus.command("fetch")
@click.argument("name", type=click.Choice(["multi30k"]), metavar="NAME")
@click.option("--to", "to", default="data/multi30k", show_default=True, type=click.Path(file_okay=False),
              help="Directory for train/val/test.en and .de.")
@click.option("--mirror", default=None, help="Base URL serving the same files (plain or gzipped), e.g. "
              "file:///data/multi30k/ [the canonical github.com/multi30k/dataset].")
def corpus_fetch(name, to, mirror):
    """Download a public corpus, each file checked against its sha256 (of the decompressed text).

    Multi30k (task 1 raw captions, en-de) comes from github.com/multi30k/dataset; files already in --to with the
    right checksum are kept; a file with a wrong checksum is an error and is not written.

    Example:

    \b
        qkvtrace corpus fetch multi30k
        qkvtrace train --corpus data/multi30k --d-model 256 --n-layers 3 --n-heads 8 --d-ff 512
    """
    from qkvtrace.fetch import fetch

    paths = fetch(name, to, mirror=mirror, progress=lambda f: click.echo(f"fetching {f}", err=True))
    click.echo(f"{name}: {len(paths)} files in {to} ({', '.join(p.name for p in paths)}), checksums verified")


# --- train commands ---

def language_options(f):
    """Language codes of multilingual Hugging Face models (NLLB, mBART, M2M100)."""
    f = click.option("--tgt-lang", "tgt_lang", default=None, metavar="CODE",
                     help="Target language code of a multilingual model: deu_Latn (NLLB), de_DE (mBART), de "
                          "(M2M100) [German].")(f)
    return click.option("--src-lang", "src_lang", default=None, metavar="CODE",
                        help="Source language code of a multilingual model: eng_Latn (NLLB), en_XX (mBART), en "
                             "(M2M100) [English].")(f)


def model_options(f):
    """The model's shape options, shared by every command that builds a model."""
    for name, typ, hlp in reversed([
            ("--d-model", int, "Embedding and residual width [64]."),
            ("--n-layers", int, "Encoder layers, and as many decoder layers [2]."),
            ("--n-heads", int, "Attention heads [4]."),
            ("--d-ff", int, "Feed-forward hidden width [128]."),
            ("--dropout", float, "Dropout probability [0.1]."),
            ("--max-len", int, "Longest sequence in tokens, <sos>/<eos> included [64].")]):
        f = click.option(name, type=typ, default=None, help=hlp)(f)
    return f


def build_configs(config_file, model_opts: dict, train_opts: dict, base: dict | None = None):
    """Defaults < `base` (a run's stored {"model": ..., "train": ...}) < --config FILE.toml < options given on the
    command line; errors name the option, or the file's line."""
    from qkvtrace.config import ModelConfig, TrainConfig, from_dict, load_toml

    values = load_toml(config_file) if config_file else {}
    where = config_file or "options"
    unknown = [k for k in values if k not in ("model", "train")]
    if unknown:
        raise QkvtraceError(f"{where}: unknown table [{unknown[0]}]; valid tables: [model], [train]")
    base = base or {}
    given = {k: v for k, v in {**model_opts, **train_opts}.items() if v is not None}

    def build(options: dict):
        layers = {t: {**base.get(t, {}), **values.get(t, {})} for t in ("model", "train")}
        layers["model"].update({k: v for k, v in options.items() if k in model_opts})
        layers["train"].update({k: v for k, v in options.items() if k in train_opts})
        return (from_dict(ModelConfig, layers["model"], f"{where} [model]"),
                from_dict(TrainConfig, layers["train"], f"{where} [train]"))

    in_file = {k for t in ("model", "train") for k in values.get(t, {})}
    if given.keys() & in_file:
        # An option that replaces a value of the file does not make the file right: the file's values are checked
        # as written first, and a bad one that an option replaces is an error naming its FILE:LINE. (An error
        # about another key, e.g. d_model not divisible by the default n_heads, may be what the options fix.)
        try:
            build({})
        except QkvtraceError as e:
            located = _config_line(e, config_file, values)
            if located and located[1] in given:
                raise located[0] from None
    try:
        return build(given)
    except QkvtraceError as e:
        # A value that came from the command line is named as its option, e.g. "--checkpoints 1,40: ...".
        msg = str(e)
        for key in given:
            if f"]: {key} " in msg:
                raise QkvtraceError("--" + key.replace("_", "-") + msg.split(f"]: {key}", 1)[1]) from None
        located = _config_line(e, config_file, values) if config_file else None
        if located:
            raise located[0] from None
        raise


def _config_line(e: QkvtraceError, config_file, values: dict) -> tuple[QkvtraceError, str] | None:
    """(the error as FILE:LINE: [table] ..., its key) when `e` is about a key the --config file sets; else None."""
    from pathlib import Path

    from qkvtrace.config import toml_line

    msg = str(e)
    for table in ("model", "train"):
        if msg.startswith(f"{config_file} [{table}]: "):
            rest = msg[len(f"{config_file} [{table}]: "):]
            key = rest.split("'")[1] if rest.startswith("unknown key '") else rest.split(" ", 1)[0]
            if key in values.get(table, {}):
                line = toml_line(Path(config_file).read_text(encoding="utf-8"), table, key)
                return (QkvtraceError(f"{config_file}:{line}: [{table}] {rest}") if line else e), key
    return None


class EpochProgress:
    """Progress for training: a tqdm bar per run on a terminal, one log line per epoch otherwise."""

    def __init__(self):
        self.bar = None
        self.tty = sys.stderr.isatty()

    def __call__(self, e: dict) -> None:
        if e["event"] == "start":
            ranks = f", {e['world_size']} processes" if e.get("world_size", 1) > 1 else ""
            click.echo(f"training on {e['pairs']} pairs, {e['steps']} steps/epoch, device {e['device']}{ranks}", err=True)
            if self.tty:
                from tqdm import tqdm

                total = (e["epochs"] - e["start_epoch"] + 1) * e["steps"]
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        elif e["event"] == "step" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"epoch {e['epoch']} loss {e['loss']:.3f} {e['tokens_per_s']:,.0f} tok/s")
        elif e["event"] == "epoch":
            line = (f"epoch {e['epoch']:3d}  train_loss {e['train_loss']:.4f}  val_loss {e['val_loss']:.4f}  "
                    f"val_acc {e['val_token_acc']:.3f}  exact {e['val_exact_match']:.3f}  bleu {e['val_bleu']:.1f}  "
                    f"{e['seconds']:.1f}s  {e['tokens_per_s']:,.0f} tok/s")
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                click.echo(line, err=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@cli.command()
@click.option("--corpus", default=None, help="builtin, a .tsv/.jsonl file or a train.en/train.de directory [builtin].")
@click.option("--src-lang", default=None, help="Source language key [en].")
@click.option("--tgt-lang", default=None, help="Target language key [de].")
@click.option("--epochs", type=int, default=None, help="Training epochs [30].")
@click.option("--checkpoints", default=None, help="Epochs to keep, e.g. 1,15,30 [first, middle, last].")
@click.option("--run-dir", default=None, help="Run directory [outputs/runs/<corpus>-seed<seed>].")
@click.option("--seed", type=SEED, default=None, help="Seed for init, batching and dropout [0].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None, help="[auto]")
@click.option("--batch-size", type=int, default=None, help="Sentence pairs per step [64].")
@click.option("--lr", type=float, default=None, help="Adam learning rate [1e-3].")
@click.option("--min-freq", type=int, default=None, help="Rarer tokens become <unk> [1].")
@click.option("--tokenizer", default=None,
              help="word, or a subword vocabulary trained on the training split: bpe:SIZE or unigram:SIZE [word].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="fp32, bf16 autocast (CPUs with bf16, GPUs), fp16 autocast with gradient scaling (CUDA) [fp32].")
@model_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with [model] and [train] tables; options given here win.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last finished epoch, with the options it was started with.")
@click.option("--force", is_flag=True, help="Start an existing run directory over.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with DistributedDataParallel in N processes on this machine (torchrun's "
                   "--nproc-per-node); --batch-size is then per process.")
@click.option("--init", "init", default=None, metavar="MODEL",
              help="Fine-tune a Hugging Face model (hf:NAME[@REVISION] or a save_pretrained folder) instead.")
@click.option("--from-scratch", is_flag=True, help="With --init: train its architecture from random weights.")
def train(corpus, src_lang, tgt_lang, epochs, checkpoints, run_dir, seed, device, batch_size, lr, min_freq, tokenizer,
          precision, d_model, n_layers, n_heads, d_ff, dropout, max_len, config_file, resume, force, nproc, init,
          from_scratch):
    """Train the translation Transformer, keeping checkpoints at chosen epochs.

    Under torchrun (or with --nproc N) every process trains on its share of each batch of N x --batch-size pairs
    with DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes the run directory.

    With --init MODEL, fine-tune a Hugging Face encoder-decoder (or train its architecture from scratch) the same
    way: checkpoints, metrics.jsonl, --resume; the run then works with every command.

    Example:

    \b
        qkvtrace train                                   # built-in corpus, 30 epochs, checkpoints 1,15,30
        qkvtrace train --epochs 10 --checkpoints 1,5,10 --run-dir outputs/runs/short
        qkvtrace train --corpus data/multi30k --d-model 256 --n-layers 3 --n-heads 8 --d-ff 512
        qkvtrace train --nproc 2 --batch-size 32         # 2 processes, global batch 64
        torchrun --nproc-per-node 4 -m qkvtrace train --device cuda --precision bf16
        qkvtrace train --corpus data/multi30k --tokenizer bpe:8000
        qkvtrace train --init hf:Helsinki-NLP/opus-mt-en-de --corpus pairs.tsv --epochs 3 --run-dir outputs/runs/ft
    """
    from pathlib import Path

    from qkvtrace import dist
    from qkvtrace.train import open_run, train as train_run

    if from_scratch and not init:
        raise QkvtraceError("--from-scratch: trains a Hugging Face architecture; name it with --init MODEL")
    if init:
        shape = {k: v for k, v in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff,
                                       dropout=dropout, min_freq=min_freq, tokenizer=tokenizer, config=config_file,
                                       nproc=nproc, precision=precision).items() if v is not None}
        if shape:
            name = next(iter(shape)).replace("_", "-")
            raise QkvtraceError(f"--{name}: the architecture and tokenizer come from --init {init}; leave it out")
        from qkvtrace.finetune import finetune

        run_dir = run_dir or f"outputs/runs/{Path(init.split('@')[0]).name}-ft-seed{seed or 0}"
        progress = EpochProgress()
        try:
            run = finetune(init, run_dir, corpus=corpus or "builtin", epochs=epochs or 3,
                           checkpoints=parse_int_list(checkpoints, "--checkpoints") if checkpoints else None,
                           lr=lr or 5e-5, batch_size=batch_size or 16, seed=seed or 0, from_scratch=from_scratch,
                           src_lang=src_lang or "en", tgt_lang=tgt_lang or "de", max_len=max_len or 128,
                           resume=resume, force=force, device=device or "cpu", progress=progress)
        except (KeyboardInterrupt, click.exceptions.Abort):
            progress.close()
            click.echo(f"finished epochs are kept; continue with: qkvtrace train --init {init} --run-dir {run_dir} "
                       "--resume (and the same options)", err=True)
            raise
        finally:
            progress.close()
        click.echo(f"run {run.path}: checkpoints at epochs {', '.join(map(str, run.checkpoint_epochs()))}")
        return

    model_opts = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, dropout=dropout, max_len=max_len)
    train_opts = dict(corpus=corpus, src_lang=src_lang, tgt_lang=tgt_lang, epochs=epochs, seed=seed, device=device,
                      batch_size=batch_size, lr=lr, min_freq=min_freq, precision=precision,
                      tokenizer=tokenizer,
                      checkpoints=parse_int_list(checkpoints, "--checkpoints") if checkpoints is not None else None)
    model_cfg, train_cfg = build_configs(config_file, model_opts, train_opts)
    run_dir = run_dir or run_dir_name(train_cfg)
    if resume and (Path(run_dir) / "run.json").is_file():
        # `--resume --run-dir DIR` alone continues with the options DIR was started with; any given here must agree.
        model_cfg, train_cfg = build_configs(config_file, model_opts, train_opts, base=open_run(run_dir).info)
    if nproc is not None and not dist.launched():
        # The options are checked above, once, before any process starts.
        dist.launch(nproc, command_argv(click.get_current_context(), drop=("nproc",)))  # rank 0 reports
        return
    if dist.launched():
        # A torchrun worker: any failure is one line naming the rank; rank 0 alone reports progress.
        with dist.report_failure():
            run = train_run(model_cfg, train_cfg, run_dir, resume=resume, force=force,
                            progress=EpochProgress() if dist.env_rank() == 0 else None)
        if run is not None:
            click.echo(f"run {run.path}: checkpoints at epochs {', '.join(map(str, run.checkpoint_epochs()))}")
        return
    progress = EpochProgress()
    try:
        run = train_run(model_cfg, train_cfg, run_dir, resume=resume, force=force, progress=progress)
    except (KeyboardInterrupt, click.exceptions.Abort):
        progress.close()
        click.echo(f"finished epochs are kept; continue with: qkvtrace train --run-dir {run_dir} --resume", err=True)
        raise
    finally:
        progress.close()
    click.echo(f"run {run.path}: checkpoints at epochs {', '.join(map(str, run.checkpoint_epochs()))}")


def run_dir_name(train_cfg) -> str:
    """The default --run-dir: outputs/runs/<corpus name>-seed<seed>."""
    from pathlib import Path

    name = "builtin" if train_cfg.corpus == "builtin" else Path(train_cfg.corpus).stem or "corpus"
    return f"outputs/runs/{name}-seed{train_cfg.seed}"


def command_argv(ctx: click.Context, drop: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives `ctx`'s command the values it was given, less the parameters in `drop`: what
    the launcher hands to each process."""
    argv = list(ctx.command_path.split()[1:])
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value is False or param.param_type_name != "option":
            continue
        argv += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return argv


@cli.command()
@click.argument("run_dir", metavar="MODEL", type=click.Path())
@click.argument("sentences", nargs=-1, required=True)
@click.option("--epoch", type=int, default=None, help="Checkpoint epoch [newest].")
@click.option("--epochs", "epochs", default=None, help="Several checkpoints, e.g. 1,15,30.")
@click.option("--beams", type=int, default=1, show_default=True,
              help="Beam search width for Hugging Face models (1 = greedy); runs of our own decode greedily.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of text.")
@language_options
def translate(run_dir, sentences, epoch, epochs, beams, as_json, src_lang, tgt_lang):
    """Translate sentences with a checkpoint of a run or a Hugging Face model.

    MODEL is a run directory, hf:NAME[@REVISION] or a save_pretrained folder. Prints the predicted tokens as the
    study did: `ich kann apfel essen <eos>`; Hugging Face models translate with their own generate.

    Example:

    \b
        qkvtrace translate outputs/runs/builtin-seed0 "i can eat apple"
        qkvtrace translate outputs/runs/builtin-seed0 "we want to eat bread" --epochs 1,15,30 --json
        qkvtrace translate hf:Helsinki-NLP/opus-mt-en-de "I can eat an apple." --beams 4
        qkvtrace translate hf:facebook/nllb-200-distilled-600M "I can eat an apple." --tgt-lang fra_Latn
    """
    import json

    from qkvtrace.sources import open_source

    run = open_source(run_dir, "run_dir", src_lang, tgt_lang)
    chosen = one_or_more_epochs(epoch, epochs, run)
    multiple = epochs is not None and len(chosen) > 1
    if beams < 1:
        raise QkvtraceError(f"--beams {beams}: expected a whole number of at least 1")
    if beams > 1 and getattr(run, "kind", "run") != "hf":
        raise QkvtraceError(f"--beams {beams}: runs of our own translate greedily; beam search is for Hugging Face "
                            "models")
    for ep in chosen:
        for t in (run.translate(list(sentences), ep, beams=beams) if beams > 1 else run.translate(list(sentences), ep)):
            if as_json:
                click.echo(json.dumps({"source": t.source, "epoch": t.epoch, "tokens": t.tokens, "text": t.text,
                                       "unknown": t.unknown}, ensure_ascii=False))
            else:
                prefix = f"[epoch {t.epoch}] " if multiple else ""
                click.echo(f"{prefix}{t.source}  ->  {' '.join(t.tokens)}")
            if t.unknown:
                click.echo(f"note: not in the source vocabulary, read as <unk>: {', '.join(t.unknown)}", err=True)

# --- extract commands ---

@cli.command()
@click.argument("run_dir", metavar="MODEL", type=click.Path())
@click.option("--sentences", "sentences_file", type=click.Path(dir_okay=False), default=None,
              help="File: one source sentence a line, optionally source<TAB>target (teacher-forced).")
@click.option("-s", "--sentence", "sentence_list", multiple=True, help="A source sentence (repeatable).")
@click.option("--words", default=None, help="Comma-separated words to keep, on either side [every token].")
@click.option("--epochs", default=None, help="Checkpoint epochs, e.g. 1,15,30 [all].")
@click.option("--sites", default="encoder.self,decoder.self,decoder.cross", show_default=True)
@click.option("--kinds", default="q,k,v,z,attn_out,layer_out", show_default=True,
              help="Also accepts the study's names x1 (= z) and x4 (= attn_out).")
@click.option("--layers", default="all", show_default=True, help="all, or e.g. 0,2.")
@click.option("--heads", default="concat", show_default=True, help="concat (d_model wide), all, or e.g. 0,3.")
@click.option("--label", default="{word}@{kind}@{epoch}", show_default=True, help="Row label template.")
@click.option("--specials", is_flag=True, help="Keep the source side's <sos>/<eos> rows.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--max-memory", "max_memory_mb", type=float, default=256, show_default=True,
              help="MB of vectors and patterns buffered before a chunk is written.")
@click.option("--format", "fmt", type=click.Choice(["native", "projector"]), default="native", show_default=True,
              help="projector also writes vectors.tsv + metadata.tsv for the TensorBoard Embedding Projector.")
@click.option("--pool", type=click.Choice(["mean", "first", "last", "none"]), default=None,
              help="Subword pieces (Hugging Face models, runs trained with --tokenizer bpe/unigram): one row per "
                   "word from the mean, first or last piece, or none (a row per piece) [mean].")
@click.option("--out", default=None, help="Output directory [outputs/vectors/<run name>].")
@click.option("--force", is_flag=True, help="Overwrite an existing --out directory.")
@language_options
def extract(run_dir, sentences_file, sentence_list, words, epochs, sites, kinds, layers, heads, label, specials,
            dtype, max_memory_mb, fmt, pool, out, force, src_lang, tgt_lang):
    """Extract Q, K, V, z (x1), attn_out (x4) and layer outputs for named words at every checkpoint.

    MODEL is a run directory, hf:NAME[@REVISION], a save_pretrained folder, a folder of checkpoint-N folders, or
    several Hugging Face references joined by commas (one checkpoint axis: how fine-tuning moves Q, K and V).

    Writes DIR/meta.csv (one row per vector), DIR/X.npy (float matrix aligned by row), DIR/manifest.json and
    DIR/patterns.jsonl (attention patterns for heatmaps).

    Example:

    \b
        qkvtrace extract outputs/runs/builtin-seed0 -s "we want to eat apple" -s "we want to eat bread" \
            --words eat,apple,bread --epochs 1,15,30 --out outputs/vectors/eat
        qkvtrace extract outputs/runs/builtin-seed0 --sentences my_sentences.txt --kinds q,k,v,x1 --heads all
        qkvtrace extract hf:Helsinki-NLP/opus-mt-en-de -s "we want to eat apple" --words eat,apple --pool mean
    """
    import json
    from pathlib import Path

    from qkvtrace.extract import extract as extract_vectors, read_sentences
    from qkvtrace.sources import open_source

    if bool(sentences_file) == bool(sentence_list):
        raise QkvtraceError("give sentences with --sentences FILE or with -s SENTENCE (one of the two)")
    sents = read_sentences(sentences_file) if sentences_file else list(sentence_list)
    out = out or f"outputs/vectors/{Path(run_dir.split(',')[0].split('@')[0]).name}"  # hf:org/name@rev -> name
    chosen = None if epochs is None else parse_epochs(epochs)  # --epochs "" is an error, not "all"
    bar = BatchProgress("extracting")
    try:
        model = open_source(run_dir, "run_dir", src_lang, tgt_lang)
        extract_vectors(model, sents, words=words, epochs=chosen, sites=sites, kinds=kinds, layers=layers,
                        heads=heads, label=label, out=out, force=force, dtype=dtype, specials=specials,
                        max_memory_mb=max_memory_mb, progress=bar, load=False, format=fmt, pool=pool)
    finally:
        bar.close()
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    click.echo(f"wrote {manifest['n_rows']} vectors ({manifest['dim_max']} wide, {dtype}) to {out}")


class BatchProgress:
    """A tqdm bar on a terminal for events {"done", "total"}; silent otherwise."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def __call__(self, e: dict) -> None:
        if self.bar is None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=e["total"], desc=self.what, unit="batch", file=sys.stderr, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.update(e["done"] - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()

# --- plot commands ---

@cli.command()
@click.argument("vectors_dir", type=click.Path())
@click.option("--method", type=click.Choice(["pca", "umap", "tsne"]), default="pca", show_default=True)
@click.option("--dims", type=int, default=2, show_default=True, help="2 or 3.")
@click.option("--where", "where", multiple=True, help='Row filter COLUMN=V1,V2 (repeatable), e.g. "kind=q,k,v".')
@click.option("--color-by", default="sentence", show_default=True, help="sentence, kind, epoch, category, token, ...")
@click.option("--label", default="{word}@{kind}@{epoch}", show_default=True, help="Point label template.")
@click.option("--label-mode", type=click.Choice(["auto", "all", "ends", "none"]), default="auto", show_default=True)
@click.option("--trajectories", is_flag=True, help="Join each vector's points across epochs with arrows.")
@click.option("--frame", type=click.Choice(["joint", "procrustes", "aligned-umap"]), default="joint",
              show_default=True, help="How epochs share one coordinate frame.")
@click.option("--facet", default=None, help="Small multiples by a column, e.g. epoch or kind.")
@click.option("--qk-joint", is_flag=True,
              help="Queries and keys of one site, layer and head in one picture: keys shifted onto the queries' "
                   "centroid, both scaled to one mean norm (attention unchanged), so nearness reflects attention.")
@click.option("--out", default=None,
              help="Figure file: .png, .svg, .pdf, or .html (interactive, offline) [VECTORS_DIR/plot.png].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the --out file if it exists.")
def plot(vectors_dir, method, dims, where, color_by, label, label_mode, trajectories, frame, facet, qk_joint, out,
         seed, force):
    """Project a vector table with PCA, UMAP or t-SNE into a labelled 2-D/3-D scatter.

    An .html figure is an interactive plotly page that works offline: hover cards, legend clicks hide a group,
    and a slider with a play button steps through the checkpoints.

    Example:

    \b
        qkvtrace plot outputs/vectors/eat --where "kind=q,k,v,x1" --where site=encoder.self --where layer=0 \
            --trajectories --out eat.png
        qkvtrace plot outputs/vectors/eat --dims 3 --method umap --frame aligned-umap --out eat.html
        qkvtrace plot outputs/vectors/heads --where kind=q,k --where site=encoder.self --where layer=0 \
            --where head=0 --qk-joint --out qk.html
    """
    from pathlib import Path

    from qkvtrace.plot import plot_table
    from qkvtrace.table import load_vectors

    path = plot_table(load_vectors(vectors_dir), out or Path(vectors_dir) / "plot.png", method=method, dims=dims,
                      where=list(where), color_by=color_by, label=label, label_mode=label_mode,
                      trajectories=trajectories, frame=frame, facet=facet, seed=seed, overwrite=force,
                      qk_joint=qk_joint)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("vectors_dir", type=click.Path())
@click.option("--out", default=None, help="Page to write [VECTORS_DIR/explorer.html].")
@click.option("--methods", default="pca,umap,tsne", show_default=True,
              help="Projections computed now and offered on the page.")
@click.option("--neighbours", "k", type=COUNT, default=10, show_default=True,
              help="Nearest neighbours by cosine listed for a clicked point.")
@click.option("--qk-joint/--no-qk-joint", default=True, show_default=True,
              help="Also offer queries and keys of each single head joined (as plot --qk-joint).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--open", "open_page", is_flag=True, help="Open the page in the default browser.")
@click.option("--force", is_flag=True, help="Overwrite the --out page if it exists.")
def view(vectors_dir, out, methods, k, qk_joint, seed, open_page, force):
    """Write one self-contained explorer page for a vector table: selectors for site, layer, head, kind, epoch
    and projection, colour by any column, search, nearest neighbours and attention rows of a clicked point.

    Works offline (plotly.js is inside the page); WebGL keeps 100,000 points usable. UMAP and t-SNE of large
    tables take minutes: pass --methods pca for a quick page.

    Example:

    \b
        qkvtrace view outputs/vectors/builtin-seed0 --open
        qkvtrace view outputs/vectors/multi30k --methods pca --out multi30k.html
    """
    from pathlib import Path

    from qkvtrace.files import check_new_files
    from qkvtrace.table import load_vectors
    from qkvtrace.web import EXPLORER_METHODS, explorer_page

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in EXPLORER_METHODS]
    if bad or not chosen:
        raise QkvtraceError(f"--methods {methods!r}: choose from {', '.join(EXPLORER_METHODS)}, e.g. pca,umap")
    out = Path(out) if out else Path(vectors_dir) / "explorer.html"
    if out.suffix.lower() != ".html":
        raise QkvtraceError(f"--out {out}: the explorer is an .html page")
    check_new_files([out], force)
    path = explorer_page(load_vectors(vectors_dir), out, methods=chosen, k=k, seed=seed, qk_joint=qk_joint,
                         progress=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@cli.command()
@click.argument("run_dir", metavar="MODEL", type=click.Path())
@click.argument("sentence_a")
@click.argument("sentence_b")
@click.option("--epoch", type=int, default=None, help="One checkpoint [newest].")
@click.option("--epochs", default=None, help="Several checkpoints, e.g. 1,15,30: a table each plus their change.")
@click.option("--kind", default="k", show_default=True, help="q, k, v, z (x1), attn_out (x4), layer_out or pattern.")
@click.option("--site", default="encoder.self", show_default=True, help="encoder.self, decoder.self, decoder.cross.")
@click.option("--layer", type=int, default=0, show_default=True)
@click.option("--head", default="concat", show_default=True, help="concat or a head index.")
@click.option("--out", default=None, help="Directory for CSV, Markdown and heatmap PNG [no files].")
@click.option("--force", is_flag=True, help="Overwrite this table's files if they are already in --out.")
@language_options
def similarity(run_dir, sentence_a, sentence_b, epoch, epochs, kind, site, layer, head, out, force, src_lang,
               tgt_lang):
    """Cosine similarity between every token of two sentences, as the study's tables.

    Rows are the tokens of SENTENCE_A, columns those of SENTENCE_B; decoder tokens are named by their
    transition (sos->wir). MODEL is a run directory or a Hugging Face reference (hf:NAME, a folder); its subword
    pieces are pooled to words by their mean.

    Example:

    \b
        qkvtrace similarity outputs/runs/builtin-seed0 "we can eat apple" "apple eat can we" --kind k
        qkvtrace similarity outputs/runs/builtin-seed0 "we can eat apple" "apple eat can we" \
            --kind q --site decoder.self --epochs 1,15,30 --out outputs/tables
    """
    from qkvtrace.compare import similarity as similarity_tables, write_similarity
    from qkvtrace.sources import open_source

    run = open_source(run_dir, "run_dir", src_lang, tgt_lang)
    tables = similarity_tables(run, sentence_a, sentence_b, kind=kind, site=site, layer=layer,
                               epochs=one_or_more_epochs(epoch, epochs, run), head=head)
    # Written before anything is printed: a failed write is one error line, not a table and then an error.
    paths = write_similarity(tables, out, overwrite=force) if out else []
    for t in tables:
        click.echo(f"{t.title}\n{t.text()}\n")
    if out:
        click.echo(f"wrote {len(paths)} files to {out}")


@cli.command()
@click.argument("run_dir", metavar="MODEL", type=click.Path())
@click.argument("sentence")
@click.option("--epochs", default=None, help="Checkpoints, e.g. 1,15,30 [all].")
@click.option("--site", default="decoder.cross", show_default=True, help="encoder.self, decoder.self, decoder.cross.")
@click.option("--layer", type=int, default=0, show_default=True)
@click.option("--target", default=None, help="Teacher-force this translation [the newest checkpoint's].")
@click.option("--out", default="attention.png", show_default=True, help="Figure: .png, .svg, .pdf or .html.")
@click.option("--force", is_flag=True, help="Overwrite the --out file if it exists.")
@language_options
def attention(run_dir, sentence, epochs, site, layer, target, out, force, src_lang, tgt_lang):
    """Attention heatmaps: a grid of heads by epochs on one shared colour scale.

    Example:

    \b
        qkvtrace attention outputs/runs/builtin-seed0 "i can eat apple" --epochs 1,15,30 --out attn.png
    """
    from qkvtrace.compare import attention as attention_patterns
    from qkvtrace.files import check_new_files, lock
    from qkvtrace.plot import FORMATS

    from pathlib import Path

    if Path(out).suffix.lower() not in FORMATS:
        raise QkvtraceError(f"--out {out}: unsupported extension; use one of {', '.join(FORMATS)}")
    check_new_files([out], force)
    with lock(out, "--out"):
        from qkvtrace.sources import open_source

        pats = attention_patterns(open_source(run_dir, "run_dir", src_lang, tgt_lang), sentence,
                                  epochs=None if epochs is None else parse_epochs(epochs),
                                  site=site, layer=layer, target=target)
        click.echo(f"wrote {pats.save(out)}")

# --- experiment commands ---

# One run cache for `study` and `run` (train.run_cache): a finished run is found there whatever --out is.
CACHE_OPTION = click.option(
    "--cache", default=None, envvar="QKVTRACE_CACHE", show_envvar=True,
    help="Run cache: finished training runs, one folder per configuration hash, reused by study and run "
         "[outputs/runs].")

@cli.command()
@click.option("--out", default="outputs/study", show_default=True, help="Output directory.")
@click.option("--epochs", default="1,15,30", show_default=True, help="Checkpoints; training runs to the last one.")
@click.option("--seeds", default="0", show_default=True,
              help="Training seeds, e.g. 0,1,2: one model each (cached); every verdict per seed and whether they "
                   "agree. Figures come from the first.")
@click.option("--method", type=click.Choice(["pca", "umap", "tsne"]), default="pca", show_default=True,
              help="Projection for the figures.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a value of the study's experiment file, e.g. model.d_model=32 (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out directory (the trained run is still reused).")
@click.option("--retrain", is_flag=True, help="Train again even if a finished run with this configuration exists.")
@CACHE_OPTION
@click.option("--model", "ref", default=None, metavar="MODEL",
              help="Judge the claims on this model instead (hf:NAME, a save_pretrained folder, a fine-tuning run, "
                   "several references joined by commas): the same experiment file, figures and report, its "
                   "checkpoints as the epochs; nothing is trained (--epochs and --seeds do not apply).")
@language_options
def study(out, epochs, seeds, method, overrides, force, retrain, cache, ref, src_lang, tgt_lang):
    """Reproduce the word-context clustering study with measured verdicts.

    Runs the study's experiment file (shipped inside qkvtrace; experiments/study.toml is a copy): trains the default
    model on the built-in corpus (or reuses the finished run in the run cache), extracts each sentence set once,
    decides every claim with numbers and a stated rule, and draws the figures. Writes OUT/report.md,
    OUT/index.html (open it in a browser), OUT/verdicts.json, OUT/figures/ and OUT/vectors/.

    Example:

    \b
        qkvtrace study
        qkvtrace study --seeds 0,1,2 --out outputs/study-seeds
        qkvtrace study --out outputs/study-umap --method umap
        qkvtrace study --model hf:Helsinki-NLP/opus-mt-en-de --out outputs/study-opus
    """
    if ref is not None:
        from qkvtrace.model_study import study_model

        result = study_model(ref, out, force=force, progress=lambda msg: click.echo(msg, err=True),
                             src_lang=src_lang, tgt_lang=tgt_lang, method=method, overrides=list(overrides))
        for v in result["verdicts"][next(iter(result["verdicts"]))]:
            click.echo(f"[{v.verdict}] ({v.key}) {v.claim}\n    {v.evidence}")
        for claim, why in result["not_applicable"]:
            click.echo(f"[does not apply] {claim}\n    {why}")
        click.echo(f"report: {result['out'] / 'index.html'} ({result['seconds']:.1f} s)")
        return
    from qkvtrace.study import run_study

    if src_lang or tgt_lang:
        raise QkvtraceError(f"--{'src' if src_lang else 'tgt'}-lang: goes with --model (a multilingual Hugging Face "
                            "model); the study's own model is trained on the built-in English -> German corpus")
    progress = EpochProgress()
    try:
        result = run_study(out, epochs=parse_int_list(epochs, "--epochs"), seeds=parse_int_list(seeds, "--seeds"),
                           method=method, force=force, retrain=retrain, cache_root=cache, overrides=list(overrides),
                           progress=lambda msg: click.echo(msg, err=True), train_progress=progress)
    finally:
        progress.close()
    seeds_run = list(result["verdicts"])
    for a, v in zip(result["agreement"], result["verdicts"][seeds_run[0]]):
        per = ", ".join(f"seed {s} {w}" for s, w in a["verdicts"].items()) if len(seeds_run) > 1 else ""
        click.echo(f"[{v.verdict}] ({v.key}) {v.claim}\n    {v.evidence}" + (f"\n    {per}" if per else ""))
    if len(seeds_run) > 1:
        agree = sum(a["agree"] for a in result["agreement"])
        click.echo(f"seeds {','.join(map(str, seeds_run))}: {agree} of {len(result['agreement'])} verdicts agree")
    click.echo(f"report: {result['out'] / 'index.html'} ({result['seconds']:.1f} s)")

@cli.command("run")
@click.argument("target", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a value of the file, e.g. train.epochs=10 or figures.NAME.dims=3 (repeatable).")
@click.option("--out", default=None, help="Output directory [outputs/<name>]; not with a directory TARGET.")
@click.option("--force", is_flag=True, help="Retrain instead of reusing a cached run, and overwrite --out.")
@CACHE_OPTION
def run_cmd(target, overrides, out, force, cache):
    """Run an experiment file end to end: train (or reuse), extract, plot, tabulate, report.

    TARGET is an experiments/*.toml file, or a directory whose *.toml files run in name order. Everything is
    validated before training; results go to outputs/<name>/ (report.md, index.html, figures/, vectors/, run/,
    config.resolved.toml). Finished runs are kept in the run cache (--cache) and reused by any experiment or study
    with the same corpus, model and training settings.

    Example:

    \b
        qkvtrace run experiments/study.toml
        qkvtrace run experiments/permutation.toml --set train.epochs=10 --set train.checkpoints=[1,5,10]
        qkvtrace run experiments/five_sentences.toml --out outputs/five --force
        qkvtrace run experiments/
    """
    from qkvtrace.experiment import run_experiments

    for path in run_experiments(target, overrides=list(overrides), out=out, force=force, cache=cache,
                                progress=lambda line: click.echo(line, err=True)):
        click.echo(f"wrote {path / 'index.html'}")

# --- bench commands ---

@cli.group()
def bench():
    """Benchmark qkvtrace against peers measured in the same run."""


@bench.command("train")
@click.option("--config", "config_name", type=click.Choice(["study", "multi30k", "both"]), default="both",
              show_default=True, help="study: defaults on the built-in corpus; multi30k: the tutorial's size.")
@click.option("--steps", type=COUNT, default=30, show_default=True, help="Batches timed per round.")
@click.option("--warmup", type=NONNEGATIVE, default=5, show_default=True, help="Untimed steps per model first.")
@click.option("--rounds", type=COUNT, default=3, show_default=True, help="Interleaved rounds of the three models.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="cpu", show_default=True)
@click.option("--corpus-dir", default="data/multi30k", show_default=True,
              help="Multi30k directory (train.en/train.de); skipped with a note if missing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per config instead of a table.")
@click.option("--nproc", type=click.IntRange(min=2), default=None,
              help="Instead: our throughput with 1 and with N DDP processes (gloo) at the same global batch.")
def bench_train_cmd(config_name, steps, warmup, rounds, device, corpus_dir, as_json, nproc):
    """Training throughput of our Transformer vs two peers of the same dimensions.

    Peers: a model on torch.nn.Transformer, and the PyTorch seq2seq tutorial's model written by hand (separate
    Q/K/V layers, masks always applied, plain cross-entropy). Same batches, all in train mode, Adam + clipping;
    the models take turns in rounds and each batch's time is its median over rounds. Throughput counts non-pad
    target tokens; ratio = ours / peer. Loss = mean over the last round's steps (the same batches for all).

    With --nproc N: ours with 1 process and with N DistributedDataParallel processes on this machine, the same
    global batches (each of the N ranks takes its share), rounds interleaved; speedup = N ranks / 1 rank.

    Example:

    \b
        qkvtrace bench train --config study --steps 30
        qkvtrace bench train --config both --json
        qkvtrace bench train --config study --nproc 2
    """
    import json

    from qkvtrace.bench import bench_train

    if nproc is not None:
        from qkvtrace.bench_scale import bench_ranks

        if device not in ("cpu", "auto"):
            raise QkvtraceError(f"--nproc with --device {device}: the rank benchmark runs on cpu (gloo)")
        rows = []
        for name in (("study", "multi30k") if config_name == "both" else (config_name,)):
            rows += bench_ranks(nproc, name, steps=steps, warmup=warmup, rounds=rounds, corpus_dir=corpus_dir,
                                progress=lambda e: click.echo(f"round {e['round']}/{e['rounds']} {e['ranks']} "
                                                              f"rank(s) {e['seconds']:.2f}s", err=True))
        if as_json:
            for r in rows:
                click.echo(json.dumps(r))
            return
        click.echo(f"{'config':<10} {'ranks':>5} {'batch/rank':>10} {'global':>6} {'tok/s':>9} {'ms/step':>8} "
                   f"{'speedup':>7}")
        for r in rows:
            click.echo(f"{r['config']:<10} {r['ranks']:>5} {r['batch_per_rank']:>10g} {r['global_batch']:>6} "
                       f"{r['tokens_per_s']:>9,.0f} {r['ms_per_step']:>8.1f} {r['speedup']:>6.2f}x")
        return

    def progress(e):
        click.echo(f"{e['config']}: round {e['round']}/{e['rounds']} {e['side']} {e['seconds']:.2f}s", err=True)

    rows = bench_train(config_name, steps=steps, warmup=warmup, rounds=rounds, device=device,
                       corpus_dir=corpus_dir, progress=progress)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    click.echo(f"{'config':<10} {'model':<15} {'tok/s':>9} {'ms/step':>8} {'loss':>7} {'ours is':>8}")
    for r in rows:
        if r["note"]:
            click.echo(f"{r['config']:<10} {r['note']}")
            continue
        for side, name, ratio in (("ours", "ours", None), ("peer", "nn.Transformer", r["ratio"]),
                                  ("tutorial", "tutorial", r["ratio_tutorial"])):
            faster = "" if ratio is None else f"{ratio:.2f}x"
            click.echo(f"{r['config']:<10} {name:<15} {r[side + '_tokens_per_s']:>9,.0f} "
                       f"{r[side + '_ms_per_step']:>8.1f} {r[side + '_loss']:>7.3f} {faster:>8}")



def _precisions(value: str) -> tuple[str, ...]:
    """--precisions "fp32,bf16" -> ("fp32", "bf16"); anything else is a one-line error."""
    from qkvtrace.config import PRECISIONS

    names = tuple(p.strip() for p in value.split(","))
    if not names or any(p not in PRECISIONS for p in names) or len(set(names)) != len(names):
        raise QkvtraceError(f"--precisions {value!r}: expected a comma-separated list of distinct "
                            f"{', '.join(PRECISIONS)}")
    return names


@bench.command("precision")
@click.option("--config", "config_name", type=click.Choice(["study", "multi30k"]), default="study", show_default=True)
@click.option("--precisions", default="fp32,bf16", show_default=True, help="Compared in this order; the first is "
              "the reference.")
@click.option("--steps", type=COUNT, default=20, show_default=True, help="Batches timed per round.")
@click.option("--warmup", type=NONNEGATIVE, default=3, show_default=True, help="Untimed steps per precision first.")
@click.option("--rounds", type=COUNT, default=3, show_default=True, help="Interleaved rounds.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--corpus-dir", default="data/multi30k", show_default=True, help="Multi30k directory (multi30k config).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per precision.")
def bench_precision_cmd(config_name, precisions, steps, warmup, rounds, device, corpus_dir, as_json):
    """Training step time of our Transformer at fp32 and under autocast (bf16, fp16 on CUDA), same batches.

    Example:

    \b
        qkvtrace bench precision --config multi30k --corpus-dir data/multi30k
        qkvtrace bench precision --device cuda --precisions fp32,bf16,fp16
    """
    import json

    from qkvtrace.bench_scale import bench_precision

    names = _precisions(precisions)
    rows = bench_precision(config_name, names, steps=steps, warmup=warmup, rounds=rounds, device=device,
                           corpus_dir=corpus_dir, progress=lambda e: click.echo(
                               f"round {e['round']}/{e['rounds']} {e['precision']} {e['seconds']:.2f}s", err=True))
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    click.echo(f"{'precision':<9} {'tok/s':>9} {'ms/step':>8} {'speedup':>7}")
    for r in rows:
        click.echo(f"{r['precision']:<9} {r['tokens_per_s']:>9,.0f} {r['ms_per_step']:>8.1f} {r['speedup']:>6.2f}x")


@bench.command("precision-runs")
@click.argument("config_file", metavar="CONFIG.toml")
@click.option("--corpus-dir", default="data/multi30k", show_default=True,
              help="Corpus directory with train.en/train.de and val.en/val.de.")
@click.option("--precisions", default="fp32,bf16", show_default=True, help="Trained in this order; the first is "
              "the reference.")
@click.option("--pairs", type=click.IntRange(min=1), default=None, help="Train on the first N training pairs only.")
@click.option("--val-pairs", type=click.IntRange(min=1), default=None,
              help="Validate on the first N validation pairs only.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Instead of the file's [train] epochs.")
@click.option("--out", default="outputs/bench/precision-runs", show_default=True,
              help="Where the runs (and a subset corpus) are written; replaced each time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per precision.")
def bench_precision_runs_cmd(config_file, corpus_dir, precisions, pairs, val_pairs, epochs, out, as_json):
    """Whole training runs at fp32 and under autocast: time per step and the final validation BLEU.

    One run per precision with CONFIG.toml's [model] and [train] tables (an experiment file or a train config),
    one after the other: the same seed, batches and initial weights. Time per step is the training time of every
    epoch over its steps (validation excluded); BLEU is the validation BLEU after the last epoch.

    Example:

    \b
        qkvtrace bench precision-runs experiments/multi30k_small.toml --corpus-dir data/multi30k
        qkvtrace bench precision-runs experiments/multi30k_small.toml --pairs 8000 --val-pairs 500 --epochs 2
    """
    import json

    from qkvtrace.bench_scale import precision_runs

    names = _precisions(precisions)
    rows = precision_runs(config_file, corpus_dir, out, names, pairs=pairs, val_pairs=val_pairs, epochs=epochs,
                          progress=lambda e: e["event"] == "epoch" and click.echo(
                              f"{e['precision']} epoch {e['epoch']}: {e['seconds']:.1f}s training, "
                              f"BLEU {e['val_bleu']:.2f}", err=True))
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    click.echo(f"{'precision':<9} {'pairs':>7} {'epochs':>6} {'ms/step':>8} {'speedup':>7} {'BLEU':>6} {'val_loss':>8}")
    for r in rows:
        click.echo(f"{r['precision']:<9} {r['pairs']:>7,} {r['epochs']:>6} {r['ms_per_step']:>8.1f} "
                   f"{r['speedup']:>6.2f}x {r['bleu']:>6.2f} {r['val_loss']:>8.3f}")


@bench.command("train-memory")
@click.option("--pairs", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Synthetic training pairs (4 to 9 made-up words a side).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Training steps of epoch 1 before the process stops.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--out", default="outputs/bench/train-memory", show_default=True,
              help="Where the synthetic corpus (kept for the next time) and the run are written.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_train_memory_cmd(pairs, steps, batch_size, out, as_json):
    """Peak resident memory of `train` on a large synthetic corpus that stays on disk.

    A fresh process trains a small model (d_model 32, 1 layer) on a corpus directory of PAIRS made-up pairs
    (with its own validation files, so its lines are streamed and its token ids memory-mapped) and stops after
    --steps steps; reported: its resident memory after the imports, once the data is ready, and its peak (VmHWM).

    Example:

    \b
        qkvtrace bench train-memory --pairs 1000000
    """
    import json
    from pathlib import Path

    from qkvtrace.bench_scale import synthetic_corpus, train_peak_memory

    import os
    import shutil

    corpus = Path(out) / f"corpus-{pairs}"
    if not corpus.is_dir():  # made aside and renamed into place: an interrupted one is never taken for whole
        shutil.rmtree(corpus.with_name(corpus.name + ".partial"), ignore_errors=True)
        os.replace(synthetic_corpus(corpus.with_name(corpus.name + ".partial"), pairs), corpus)
    row = train_peak_memory(corpus, Path(out), steps=steps, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(row))
        return
    click.echo(f"{row['pairs']:,} pairs, {steps} steps at batch {batch_size}: peak RSS {row['rss_peak_mb']:,.0f} MB "
               f"({row['rss_ready_mb']:,.0f} MB once the data is ready, {row['rss_imports_mb']:,.0f} MB after imports)")


@bench.command("extract")
@click.option("--config", "config_name", type=click.Choice(["study", "multi30k"]), default="study", show_default=True)
@click.option("--sentences", "n_sentences", type=COUNT, default=512, show_default=True)
@click.option("--rounds", type=COUNT, default=3, show_default=True)
@click.option("--memory", is_flag=True, help="Also measure peak memory of streaming 1x and 4x the sentences.")
@click.option("--corpus-dir", default="data/multi30k", show_default=True)
@click.option("--model", "ref", default=None, metavar="MODEL",
              help="A Hugging Face model (hf:NAME or a save_pretrained folder) instead of --config: capture of every "
                   "kind vs the library's own forward on Multi30k sentences.")
@click.option("--max-memory", "max_memory_mb", type=float, default=256, show_default=True,
              help="With --model --memory: the streaming extraction's --max-memory.")
@click.option("--json", "as_json", is_flag=True)
def bench_extract_cmd(config_name, n_sentences, rounds, memory, corpus_dir, ref, max_memory_mb, as_json):
    """Cost of capturing every hook point vs a plain batched forward over the same sentences.

    Example:

    \b
        qkvtrace bench extract
        qkvtrace bench extract --config multi30k --sentences 1000 --memory
        qkvtrace bench make-marian outputs/marian-random
        qkvtrace bench extract --model outputs/marian-random --sentences 1000 --rounds 2 --memory
    """
    import json

    if ref is not None:
        from qkvtrace.bench import bench_extract_hf

        r = bench_extract_hf(ref, n_sentences, rounds=rounds, corpus_dir=corpus_dir, memory=memory,
                             max_memory_mb=max_memory_mb)
        if as_json:
            click.echo(json.dumps(r))
            return
        click.echo(f"{r['model']} ({r['family']}, {r['params'] / 1e6:.1f}M parameters): {r['n_sentences']} sentences, "
                   f"{r['n_pieces']} pieces, batches of {r['batch_size']}, {r['threads']} threads")
        click.echo(f"library forward {r['plain_s']:.2f} s | its encoder+decoder stacks {r['stacks_s']:.2f} s | "
                   f"capture of every kind {r['capture_s']:.2f} s ({r['capture_vs_plain']:.2f}x the forward, "
                   f"{r['capture_vs_stacks']:.2f}x the stacks)")
        if memory:
            click.echo(f"streaming extraction: {r['stream_rows']} vectors, {r['stream_mb_written']:.0f} MB written in "
                       f"{r['stream_s']:.0f} s, --max-memory {r['max_memory_mb']:.0f}: peak RSS "
                       f"{r['stream_peak_rss_mb']:.0f} MB")
        return

    from qkvtrace.bench import bench_extract, extract_peak_memory

    r = bench_extract(config_name, n_sentences, rounds=rounds, corpus_dir=corpus_dir)
    rows = [r]
    if memory:
        rows += [extract_peak_memory(config_name, n, 32, corpus_dir) for n in (n_sentences, 4 * n_sentences)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(f"{r['config']}: {r['n_sentences']} sentences, {r['n_tokens']} tokens, {r['n_rows']} vectors "
               f"({r['bytes_per_token'] / 1024:.1f} KB per token)")
    click.echo(f"plain forward {r['plain_s']:.3f} s | capture {r['capture_s']:.3f} s ({r['capture_ratio']:.2f}x) | "
               f"extract to a table {r['extract_s']:.3f} s ({r['extract_ratio']:.2f}x, rounds "
               f"{r['extract_ratio_range'][0]:.2f}-{r['extract_ratio_range'][1]:.2f}x; "
               f"{r['extract_vs_hidden_ratio']:.2f}x a forward without the output layer)")
    for m in rows[1:]:
        click.echo(f"streaming {m['n_sentences']} sentences ({m['rows']} vectors, X.npy {m['x_mb']:.0f} MB, "
                   f"--max-memory {m['max_memory_mb']:.0f}): peak RSS {m['rss_peak_mb']:.0f} MB")


@bench.command("make-marian")
@click.argument("out", type=click.Path())
@click.option("--corpus-dir", default="data/multi30k", show_default=True,
              help="Training text for the model's unigram tokenizer.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def bench_make_marian_cmd(out, corpus_dir, seed, force):
    """Save a randomly initialised Marian model of opus-mt-en-de's size (~74M parameters) for benchmarks.

    Its tokenizer is trained here on the corpus; nothing is downloaded.

    Example:

    \b
        qkvtrace bench make-marian outputs/marian-random
    """
    from qkvtrace.bench import make_random_marian
    from qkvtrace.files import check_new_files

    check_new_files([out], force)
    r = make_random_marian(out, corpus_dir, seed)
    click.echo(f"wrote {out}: MarianMTModel, {r['params'] / 1e6:.1f}M parameters, {r['pieces']} tokenizer pieces")


class _NoteHandler(logging.Handler):
    """Each library warning as one `note: ...` line on the stderr of the moment, not the one of the first call:
    main() may run many times in one process (tests capture each call's output)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `qkvtrace` console script."""
    # Library warnings (e.g. "the first UMAP run compiles ...") reach the user as one "note:" line each.
    logger = logging.getLogger("qkvtrace")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler())
        logger.setLevel(logging.WARNING)
    try:
        cli.main(args=argv, prog_name="qkvtrace", standalone_mode=False)
    except QkvtraceError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # Click's own three-line usage error, folded into the one line every other error gets.
        where = e.ctx.command_path if e.ctx else "qkvtrace"
        click.echo(f"error: {e.format_message().rstrip('.')} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        # The environment refused (a read-only or full disk, a path below a file, ...): not a bug in qkvtrace.
        # Writes are translated with their option where they happen; this catches any that are not.
        from qkvtrace.files import os_reason

        where = f"{e.filename}: " if e.filename is not None else ""
        click.echo(f"error: {where}{os_reason(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def console() -> None:
    """The `qkvtrace` console script and `python -m qkvtrace`: `main`, then a quick exit.

    When a command returns, everything it wrote is closed and in place; what is left is the interpreter's teardown
    of torch, matplotlib and the rest, 0.4-0.5 s of `qkvtrace study`'s 5.5 s (measured with and without it). So
    the exit handlers (logging, multiprocessing) run, the streams are flushed, and the process ends there with the
    command's exit code. A bug's traceback is printed as usual. `main` itself returns, for in-process callers.
    """
    import atexit
    import os

    try:
        main()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`qkvtrace ... | head`) or a closed stream
            pass
    os._exit(code)
