"""Experiments: one `experiments/NAME.toml` run end to end into `outputs/NAME/` (training, extraction, figures,
tables and a report).

    schema.py   the file format: dataclasses, `--set` overrides, `load_experiment` with located errors
    writer.py   an experiment written back as TOML (`config.resolved.toml`)
    run.py      `run_experiment`: train or reuse the run, draw the figures, write the report
"""

from qkvtrace.experiment.run import run_experiment, run_experiments
from qkvtrace.experiment.schema import (AttentionFigure, Experiment, ExtractOptions, ScatterFigure, SentenceItem,
                                        SimilarityFigure, apply_overrides, load_experiment)
from qkvtrace.experiment.writer import resolved_toml

__all__ = ["AttentionFigure", "Experiment", "ExtractOptions", "ScatterFigure", "SentenceItem", "SimilarityFigure",
           "apply_overrides", "load_experiment", "resolved_toml", "run_experiment", "run_experiments"]
