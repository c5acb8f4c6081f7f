"""`hnmix compare`: methods side by side at equal budget, mean +- std over seeds, differences with 95 % CIs.

Modules: config (CompareConfig), grid (parsing and crossing --grid), runs (launching and resuming pretrain
runs), evaluate (kNN, probe, analysis of each run), stats (t-intervals), claims (the papers' claims),
plots and report (Markdown, JSON, PNG, console), run (the driver).
"""

from __future__ import annotations


def run_compare(cfg, console=None) -> dict:
    """Pretrain (or resume) every grid point, evaluate, and write the report; see hnmix.compare.run."""
    from hnmix.compare.run import (
        run_compare as run,  # imported here: the CLI loads this package for its config
    )

    return run(cfg, console)
