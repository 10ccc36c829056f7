"""Bad input across commands, by class: every case is one line `error: ...` naming the option or value and what is
right, exit code 2, and nothing written. Found by a sweep of about 300 bad inputs over every command; the classes
here are the ones that crashed, hung, printed several lines or were accepted."""

import pytest

from tests.conftest import PAIRS

RANGE = "is not in the range"


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


# Seeds reach numpy/scikit-learn (0..2**32-1); counts of rounds, steps, sentences and neighbours are at least 1.
# Before: tracebacks (train/plot --seed -1, bench extract --rounds 0), a hang (bench extract --sentences -1) or a
# 2 TiB allocation (view --neighbours 1000000000, see test_neighbours_beyond_the_table_are_clamped).
@pytest.mark.parametrize("args,message", [
    (["train", "--seed", "-1"], f"'--seed': -1 {RANGE} 0<=x<=4294967295"),
    (["train", "--seed", "99999999999999999999"], f"'--seed': 99999999999999999999 {RANGE} 0<=x<=4294967295"),
    (["plot", "vectors", "--seed", "-1"], f"'--seed': -1 {RANGE} 0<=x<=4294967295"),
    (["view", "vectors", "--seed", "4294967296"], f"'--seed': 4294967296 {RANGE} 0<=x<=4294967295"),
    (["corpus", "builtin", "--seed", "-2"], f"'--seed': -2 {RANGE} 0<=x<=4294967295"),
    (["view", "vectors", "--neighbours", "0"], f"'--neighbours': 0 {RANGE} x>=1"),
    (["bench", "extract", "--sentences", "-1"], f"'--sentences': -1 {RANGE} x>=1"),
    (["bench", "extract", "--rounds", "0"], f"'--rounds': 0 {RANGE} x>=1"),
    (["bench", "train", "--steps", "0"], f"'--steps': 0 {RANGE} x>=1"),
    (["bench", "precision", "--warmup", "-1"], f"'--warmup': -1 {RANGE} x>=0"),
    (["bench", "precision", "--precisions", "fp32,fp32"], "--precisions 'fp32,fp32': expected a comma-separated "
                                                           "list of distinct fp32, bf16, fp16"),
    (["study", "--seeds", "0,-1"], "--seeds 0,-1: expected distinct seeds in 0..4294967295"),
    (["corpus", "fetch", "bogus"], "Invalid value for 'NAME': 'bogus' is not 'multi30k'"),
])
def test_ranges_and_choices(qkvtrace_cli, tmp_path, args, message):
    err = one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert message in err
    assert not list(tmp_path.iterdir())


# An empty path meant the current directory (train --run-dir "" trained into it) or the default (extract --out "").
@pytest.mark.parametrize("args,name", [
    (["train", "--run-dir", ""], "--run-dir"), (["extract", "run", "-s", "i eat", "--out", ""], "--out"),
    (["plot", "vectors", "--out", ""], "--out"), (["translate", "", "i eat"], "MODEL"),
    (["study", "--model", ""], "--model"), (["run", "x.toml", "--cache", ""], "--cache"),
    (["corpus", ""], "SPEC"), (["corpus", "fetch", "multi30k", "--to", ""], "--to"),  # the corpus group's commands
])
def test_empty_paths(qkvtrace_cli, tmp_path, args, name):
    assert f"error: {name} '': empty; give a file or folder name" in one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert not list(tmp_path.iterdir())


def test_seed_in_a_config_file(qkvtrace_cli, tmp_path, tiny_tsv):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 1\nseed = -1\n")
    err = one_line_error(qkvtrace_cli("train", "--corpus", tiny_tsv, "--config", config, "--run-dir", tmp_path / "r"))
    assert f"{config}:3: [train] seed -1: must be a whole number in 0..4294967295" in err
    assert not (tmp_path / "r").exists()


def test_resume_of_a_run_that_does_not_exist(qkvtrace_cli, tmp_path, tiny_tsv):
    err = one_line_error(qkvtrace_cli("train", "--corpus", tiny_tsv, "--epochs", "1", "--run-dir", tmp_path / "new",
                                      "--resume"))
    assert f"--resume: {tmp_path / 'new'} is not a run (no run.json) and there is nothing to resume" in err
    assert not list(tmp_path.iterdir())


# An epoch given twice: translate and similarity refused it, extract wrote the rows twice, attention drew a column
# twice (and failed on the repeated checkpoint's translation); an empty --target was read as "no target".
@pytest.mark.parametrize("args,message", [
    (["extract", "{run}", "-s", "i can eat apple", "--epochs", "1,1", "--out", "v"],
     "--epochs 1,1: epoch 1 given more than once; give each epoch once"),
    (["attention", "{run}", "i can eat apple", "--epochs", "2,1,2", "--out", "a.png"],
     "--epochs 2,1,2: epoch 2 given more than once"),
    (["attention", "{run}", "i can eat apple", "--target", " ", "--out", "a.png"],
     "--target ' ': empty; give the translation to teacher-force"),
])
def test_repeated_epochs_and_empty_target(qkvtrace_cli, tmp_path, tiny_run, args, message):
    args = [str(tiny_run.path) if a == "{run}" else a for a in args]
    assert message in one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert not list(tmp_path.iterdir())


def test_similarity_refuses_a_run_directory_as_out(qkvtrace_cli, tmp_path, tiny_run):
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "run.json").write_text("{}")
    err = one_line_error(qkvtrace_cli("similarity", tiny_run.path, "i can eat apple", "i eat bread", "--out", other))
    assert f"--out {other}: a run directory; write the tables to a folder of their own" in err
    assert [p.name for p in other.iterdir()] == ["run.json"]


def test_a_translation_cut_at_max_len_is_teacher_forced_as_far_as_it_fits(tiny_run, monkeypatch):
    """attention on a decoder site takes the newest checkpoint's translation as the target; one that ran to max_len
    without <eos> has no room for <sos>/<eos> and was refused as if the user had typed it ("shorten it")."""
    from types import SimpleNamespace

    from qkvtrace.compare import attention

    max_len = tiny_run.model_cfg.max_len
    runaway = " ".join([PAIRS[0][1].split()[0]] * (max_len - 1))
    monkeypatch.setattr(tiny_run, "translate", lambda sentences, epoch=None, device="cpu":
                        [SimpleNamespace(text=runaway) for _ in sentences])
    pats = attention(tiny_run, "i can eat apple", epochs=[1, 2])
    assert len(pats.query_tokens) == max_len - 1  # <sos> + max_len - 2 words, then <eos>
    assert [p.shape[1] for p in pats.patterns] == [max_len - 1] * 2


def test_neighbours_beyond_the_table_are_clamped(tiny_run, tmp_path):
    from qkvtrace.extract import extract
    from qkvtrace.web import explorer_data

    table = extract(tiny_run, ["i can eat apple"], kinds="q", sites="encoder.self", epochs=[1])
    data = explorer_data(table, methods=("pca",), k=10**6, qk_joint=False)
    assert data["k"] == len(table) - 1


def test_hf_reference_without_network_is_one_line(qkvtrace_cli, tmp_path, monkeypatch):
    """Not cached and no network: one line saying so at once, instead of huggingface_hub's retry lines (~25 s)."""
    pytest.importorskip("transformers")
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    err = one_line_error(qkvtrace_cli("translate", "hf:nobody/nothing", "hello"))
    assert ("hf:nobody/nothing: not in the local Hugging Face cache, and huggingface.co cannot be reached (offline); "
            "download it once with network access, or pass a local folder written by save_pretrained") in err


# --- the library names its parameters, the command line its options -------------------------------------------

@pytest.fixture(scope="module")
def vectors(tiny_run, tmp_path_factory):
    """A vector table folder as `extract --out` writes it: q, k, v at two sites, concatenated heads, two epochs."""
    from qkvtrace.extract import extract

    out = tmp_path_factory.mktemp("vectors") / "v"
    extract(tiny_run, ["i can eat apple", "i eat bread"], kinds="q,k,v", sites="encoder.self,decoder.self",
            epochs=[1, 2], out=out)
    return out


# Each message is raised by a library function naming its parameter (param=); the command names the option.
# Before: the library itself wrote "--qk-joint ...", "--resume and --force ...", "--corpus-dir ..." etc.
@pytest.mark.parametrize("args,message", [
    (["plot", "{vectors}", "--qk-joint", "--out", "a.png"],
     "--qk-joint draws queries and keys together: select kinds q and k only (where kind=q,k), not k, q, v"),
    (["plot", "{vectors}", "--qk-joint", "--where", "kind=q,k", "--out", "a.png"],
     "--qk-joint needs one site, the selection has encoder.self, decoder.self: select where site=encoder.self"),
    (["plot", "{vectors}", "--qk-joint", "--where", "kind=q,k", "--where", "site=encoder.self", "--out", "a.png"],
     "--qk-joint needs one attention head, not the concatenated heads: extract with heads all"),
    (["plot", "{vectors}", "--color-by", "colour", "--out", "a.png"], "--color-by 'colour': no such column"),
    (["plot", "{vectors}", "--facet", "facets", "--out", "a.png"], "--facet 'facets': no such column"),
    (["plot", "{vectors}", "--where", "site=decoder.self", "--where", "token=apple", "--out", "a.png"],
     "--where site=decoder.self, token=apple: no row matches all of them; where "),
    (["plot", "{vectors}", "--frame", "aligned-umap", "--out", "a.png"],
     "--frame aligned-umap works only with method umap, not 'pca'; use procrustes or joint with other methods"),
    (["plot", "{vectors}", "--out", "{vectors}/exists.png"], "--out {vectors}/exists.png: already exists"),
    (["train", "--resume", "--force", "--run-dir", "r"], "--resume and --force contradict each other: choose one"),
    (["train", "--init", "hf:nobody/nothing", "--resume", "--force", "--run-dir", "r"],
     "--resume and --force contradict each other: choose one"),
    (["train", "--init", "hf:nobody/nothing", "--force", "--run-dir", "{foreign}"],
     "--run-dir {foreign}: not a qkvtrace run (holds thesis.tex); force only starts a run over"),
    (["train", "--init", "hf:nobody/nothing", "--resume", "--run-dir", "{unfinished}"],
     "--resume: {unfinished} has no checkpoint to resume from; start it over with --force"),
    (["train", "--src-lang", "fr", "--run-dir", "r"],
     "--src-lang and --tgt-lang fr/de: the builtin corpus is English-German; use en/de or de/en"),
    (["corpus", "builtin", "--tgt-lang", "fr"],
     "--src-lang and --tgt-lang en/fr: the builtin corpus is English-German; use en/de or de/en"),
    (["bench", "extract", "--model", "{run}"], "--model {run}: not a Hugging Face model (hf:NAME or a save_pretrained"),
    (["bench", "extract", "--model", "nowhere"], "--model nowhere: not a Hugging Face model (hf:NAME or a "
                                                 "save_pretrained folder), and no such folder exists"),
    (["extract", "nowhere", "-s", "we eat", "--out", "v"],
     "MODEL nowhere: no such run directory or model folder; give a run directory"),
    (["translate", "{foreign}", "we eat"],
     "MODEL {foreign}: neither a run directory (no run.json) nor a Hugging Face model folder (no config.json)"),
    (["bench", "precision", "--config", "multi30k", "--corpus-dir", "nowhere"],
     "--corpus-dir nowhere: no Multi30k train.en/train.de there"),
    (["bench", "train", "--nproc", "2", "--config", "multi30k", "--corpus-dir", "nowhere"],  # not "rank 0: ..."
     "error: --corpus-dir nowhere: no Multi30k train.en/train.de there"),
    (["bench", "precision-runs", "{toml}", "--corpus-dir", "nowhere"], "--corpus-dir nowhere: no train.en there"),
])
def test_library_errors_name_the_option(qkvtrace_cli, tmp_path, tiny_run, vectors, args, message):
    foreign, unfinished = foreign_and_unfinished(tmp_path)
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nd_model = 16\n")
    (vectors / "exists.png").write_bytes(b"mine")
    assert_refused(qkvtrace_cli, tmp_path, args, message, {"{vectors}": vectors, "{foreign}": foreign,
                                                           "{unfinished}": unfinished, "{toml}": toml,
                                                           "{run}": tiny_run.path})
    assert (vectors / "exists.png").read_bytes() == b"mine" and not (vectors / "a.png").exists()


def foreign_and_unfinished(tmp_path):
    """A folder that is not a run (it holds thesis.tex) and a run that finished no epoch."""
    foreign, unfinished = tmp_path / "foreign", tmp_path / "unfinished"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    return foreign, unfinished


def assert_refused(qkvtrace_cli, tmp_path, args, message, names: dict):
    """The command (args with each {name} filled in) prints `message` in one error line and writes nothing."""
    def fill(s):
        for name, value in names.items():
            s = s.replace(name, str(value))
        return s

    before = sorted(p.name for p in tmp_path.iterdir())
    assert fill(message) in one_line_error(qkvtrace_cli(*map(fill, args), cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_library_errors_name_the_parameter(tiny_run, tiny_configs, tmp_path, vectors):
    """Called from Python, the same errors name the function's parameters, and no command-line option."""
    from qkvtrace.bench_scale import bench_ranks, bench_precision
    from qkvtrace.corpus import load_corpus
    from qkvtrace.errors import QkvtraceError
    from qkvtrace.plot import plot_table
    from qkvtrace.table import load_vectors
    from qkvtrace.train import train

    model_cfg, train_cfg = tiny_configs
    table = load_vectors(vectors)
    calls = [
        (lambda: train(model_cfg, train_cfg, tmp_path / "r", resume=True, force=True),
         "resume and force contradict each other: choose one"),
        (lambda: plot_table(table, tmp_path / "a.png", where=["kind=q,k", "site=encoder.self"], qk_joint=True),
         "qk_joint needs one attention head, not the concatenated heads: extract with heads all (or e.g. 0,1) and "
         "select where head=0"),
        (lambda: plot_table(table, tmp_path / "a.png", color_by="colour"), "color_by 'colour': no such column"),
        (lambda: load_corpus("builtin", src_lang="de", tgt_lang="fr"),
         "src_lang and tgt_lang de/fr: the builtin corpus is English-German"),
        (lambda: bench_ranks(nproc=1), "nproc 1: compare at least 2 ranks with 1"),
        (lambda: bench_precision(config="big"), "config 'big': expected study or multi30k"),
    ]
    for call, message in calls:
        with pytest.raises(QkvtraceError) as e:
            call()
        assert str(e.value).startswith(message) and "--" not in str(e.value), str(e.value)
    assert not list(tmp_path.iterdir())


def test_a_bad_value_in_the_config_file_is_an_error_even_when_an_option_replaces_it(qkvtrace_cli, tmp_path,
                                                                                    tiny_tsv):
    """build_configs merged the options over the file before checking, so --d-model 16 hid d_model = "abc"."""
    config = tmp_path / "c.toml"
    config.write_text('[model]\nn_heads = 2\nd_model = "abc"\n')
    err = one_line_error(qkvtrace_cli("train", "--corpus", tiny_tsv, "--config", config, "--d-model", "16",
                                      "--run-dir", tmp_path / "r"))
    assert f"{config}:3: [model] d_model = 'abc' should be an integer" in err
    assert not (tmp_path / "r").exists()


def test_an_option_may_fix_what_the_file_leaves_inconsistent(tmp_path):
    """The file's d_model 30 does not divide by the default n_heads 4, but with --n-heads 2 the run is right: only a
    bad value that an option replaces is the file's error."""
    from qkvtrace.cli import build_configs

    config = tmp_path / "c.toml"
    config.write_text("[model]\nd_model = 30\n")
    model_cfg, _ = build_configs(config, {"n_heads": 2, "d_model": None}, {"epochs": None})
    assert (model_cfg.d_model, model_cfg.n_heads) == (30, 2)

def test_similarity_refuses_a_vector_table_as_out(qkvtrace_cli, tiny_run, vectors):
    """--force replaced the tables' files, not the folder: it added CSV, Markdown and PNG files to a vector
    table's folder (which `extract --force` then refused as foreign files)."""
    before = sorted(p.name for p in vectors.iterdir())
    err = one_line_error(qkvtrace_cli("similarity", tiny_run.path, "i can eat apple", "i eat bread", "--out",
                                      vectors, "--force"))
    assert (f"--out {vectors}: holds a vector table; write the tables to a folder of their own, e.g. "
            f"{vectors}-similarity") in err
    assert sorted(p.name for p in vectors.iterdir()) == before



# --- remedies name other parameters: {name} placeholders, spelled as options by the command line ----------------

@pytest.fixture(scope="module")
def damaged_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose source vocabulary still parses but no longer matches run.json's sha256."""
    import json
    import shutil

    copy = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_run.path, copy)
    name = next(n for n in json.loads((copy / "run.json").read_text())["files"] if n.endswith(".json"))
    (copy / name).write_text((copy / name).read_text() + "\n")
    return copy, name


def test_a_remedy_is_spelled_as_python_passes_it():
    """Only the listed placeholders are filled (a message may hold other braces); the CLI's spelling wins."""
    from qkvtrace.errors import QkvtraceError

    e = QkvtraceError("d: already exists; pass {force} to replace it, not {x = 1} or {where}", param="out",
                      mentions=("force=True", "precision"))
    assert str(e) == "out d: already exists; pass force=True to replace it, not {x = 1} or {where}"
    e.option, e.spelled["force"] = "--out", "--force"
    assert str(e) == "--out d: already exists; pass --force to replace it, not {x = 1} or {where}"


# Each remedy raised by a library function, as the command line shows it (as before this change); the same calls
# from Python are in test_remedies_name_parameters_from_python.
@pytest.mark.parametrize("args,message", [
    (["corpus", "builtin", "--export", "{exists}"],
     "error: --export {exists}: already exists; pass --force to overwrite it or choose another path"),
    (["corpus", "{jsonl}"], "choose keys with --src-lang/--tgt-lang"),
    (["corpus", "nope.tsv"], "corpus nope.tsv: no such file or directory; use --corpus builtin, a .tsv/.jsonl"),
    (["train", "--run-dir", "{foreign}"],
     "error: run directory {foreign} already exists; pass --resume to continue it or --force to start it over"),
    (["train", "--device", "cpu", "--precision", "fp16", "--run-dir", "r"],
     "error: --precision fp16: needs a CUDA device (gradient scaling), here cpu; use --precision bf16 or fp32"),
    (["train", "--resume", "--run-dir", "new"],
     "error: --resume: new is not a run (no run.json) and there is nothing to resume; leave --resume out to start it"),
    # translate has no --force: the remedy is train's option
    (["translate", "{damaged}", "i eat"], "; train the run again with --force"),
    (["translate", "{run},hf:x/y", "i eat"], "error: MODEL {run}: several references form one checkpoint axis"),
    (["study", "--model", "{run},hf:x/y", "--out", "s"], "error: --model {run}: several references form one"),
    (["bench", "extract", "--model", "{run},hf:x/y"], "error: --model {run}: several references form one"),
])
def test_remedies_name_options(qkvtrace_cli, tmp_path, tiny_run, damaged_run, args, message):
    foreign, unfinished = foreign_and_unfinished(tmp_path)
    exists, jsonl = tmp_path / "exists.tsv", tmp_path / "c.jsonl"
    exists.write_text("mine")
    jsonl.write_text('{"en": "a", "fr": "b"}\n')
    assert_refused(qkvtrace_cli, tmp_path, args, message, {"{foreign}": foreign, "{unfinished}": unfinished,
                                                           "{exists}": exists, "{jsonl}": jsonl,
                                                           "{damaged}": damaged_run[0], "{run}": tiny_run.path})
    assert exists.read_text() == "mine" and [p.name for p in foreign.iterdir()] == ["thesis.tex"]


def test_remedies_name_parameters_from_python(tiny_configs, tiny_run, damaged_run, tmp_path):
    """The same remedies called from Python name the parameters as Python passes them, and no option."""
    import torch

    from qkvtrace import files
    from qkvtrace.corpus import export_tsv, load_corpus
    from qkvtrace.errors import QkvtraceError
    from qkvtrace.sources import open_source
    from qkvtrace.train import Run, make_precision, train

    model_cfg, train_cfg = tiny_configs
    exists, jsonl, foreign = tmp_path / "exists.tsv", tmp_path / "c.jsonl", tmp_path / "foreign"
    exists.write_text("mine")
    jsonl.write_text('{"en": "a", "fr": "b"}\n')
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    damaged, name = damaged_run
    calls = [
        (lambda: files.check_new_files([exists], option="out"),
         f"out {exists}: already exists; pass force=True to overwrite it or choose another path"),
        (lambda: export_tsv(load_corpus("builtin"), exists),
         f"export_path {exists}: already exists; pass force=True to overwrite it"),
        (lambda: load_corpus(str(jsonl)), "(keys: en, fr); choose keys with src_lang/tgt_lang"),
        (lambda: load_corpus("nope.tsv"), "corpus nope.tsv: no such file or directory; use corpus builtin, a .tsv"),
        (lambda: train(model_cfg, train_cfg, foreign),
         f"run directory {foreign} already exists; pass resume=True to continue it or force=True to start it over"),
        (lambda: make_precision("fp16", torch.device("cpu")),
         "precision fp16: needs a CUDA device (gradient scaling), here cpu; use precision bf16 or fp32"),
        (lambda: Run(damaged), f"{damaged / name}: damaged or replaced: sha256 "),
        (lambda: Run(damaged), "; train the run again with force=True"),
        (lambda: open_source([str(tiny_run.path), "hf:x/y"]), f"ref {tiny_run.path}: several references form"),
    ]
    for call, message in calls:
        with pytest.raises(QkvtraceError) as e:
            call()
        assert message in str(e.value) and "--" not in str(e.value) and "{" not in str(e.value), str(e.value)
    assert exists.read_text() == "mine" and [p.name for p in foreign.iterdir()] == ["thesis.tex"]
