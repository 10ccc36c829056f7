"""qkvtrace: train a translation Transformer and trace its Q, K, V and post-attention vectors across checkpoints.

The public API, re-exported lazily (torch, sklearn and matplotlib load on first use, so `qkvtrace --help` stays
fast): configs, corpora, training, extraction, projection, plotting, interactive pages, comparisons, experiments
and the study.
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_EXPORTS = {
    "QkvtraceError": "qkvtrace.errors",
    "ModelConfig": "qkvtrace.config", "TrainConfig": "qkvtrace.config",
    "load_corpus": "qkvtrace.corpus", "builtin_corpus": "qkvtrace.corpus",
    "Vocab": "qkvtrace.vocab", "tokenize": "qkvtrace.vocab",
    "Transformer": "qkvtrace.model",
    "train": "qkvtrace.train", "open_run": "qkvtrace.train", "Run": "qkvtrace.train",
    "train_or_reuse": "qkvtrace.train",
    "extract": "qkvtrace.extract", "capture": "qkvtrace.extract",
    "VectorTable": "qkvtrace.table", "load_vectors": "qkvtrace.table",
    "project": "qkvtrace.project", "project_epochs": "qkvtrace.project", "cosine_matrix": "qkvtrace.project",
    "linear_cka": "qkvtrace.project", "silhouette": "qkvtrace.project", "neighbour_purity": "qkvtrace.project",
    "scatter": "qkvtrace.plot", "scatter_figure": "qkvtrace.plot", "plot_table": "qkvtrace.plot",
    "heatmap": "qkvtrace.plot", "save_figure": "qkvtrace.plot",
    "qk_joint": "qkvtrace.project", "scatter_page": "qkvtrace.web", "explorer_page": "qkvtrace.web",
    "similarity": "qkvtrace.compare", "attention": "qkvtrace.compare",
    "run_experiment": "qkvtrace.experiment", "load_experiment": "qkvtrace.experiment",
    "run_study": "qkvtrace.study",
}
__all__ = sorted(_EXPORTS)


# Functions named like their module (extract in qkvtrace.extract, ...): importing the module binds it as a package
# attribute of that name, so a plain lazy __getattr__ would hand out the module from then on.
_SHADOWED = frozenset(n for n, m in _EXPORTS.items() if m == f"{__name__}.{n}")


class _Package(ModuleType):
    """The package module, whose `extract`, `train` and `project` are always the public functions."""

    def __getattribute__(self, name: str):
        if name in _SHADOWED:
            return getattr(import_module(_EXPORTS[name]), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qkvtrace' has no attribute {name!r}")


def __dir__():
    return __all__
