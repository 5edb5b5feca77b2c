"""The SST-2 example as an importable package (run from the repository root).

``examples.text_classification`` (TextClassifier, TextClassificationData) and
``examples.fit_summary`` (FitSummary) are what ``examples/configs/*.yaml`` name by ``class_path``;
the ``lightning-peft`` CLI puts the current directory on ``sys.path``, so they resolve when it runs
from the repository root. They are example code, not part of the ``lightning_peft`` package.
"""
