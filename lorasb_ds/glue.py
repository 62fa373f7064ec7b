"""GLUE: the tasks' columns and labels, and their metrics.

Each task is a sentence or a sentence pair with an integer label (``stsb``: a similarity score in
[0, 5], trained by regression with one output). Rows are read from the hub (``nyu-mll/glue``, subset =
task) or from local files with the same columns (``scripts/download_datasets.py`` writes them).

Metrics, per task as GLUE reports them (all computed here in plain Python, no extra dependency):

* accuracy: fraction of exact label matches;
* F1 (``mrpc``, ``qqp``): of the positive class 1, ``2 tp / (2 tp + fp + fn)``;
* Matthews correlation (``cola``): ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``, 0 when a
  factor is 0;
* Pearson and Spearman correlation (``stsb``): of predictions and gold scores; Spearman is Pearson of
  the ranks, ties sharing their mean rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple[str, ...]
    """One column (single sentence) or two (a pair, encoded together)."""
    num_labels: int
    """Outputs of the head: classes, or 1 for regression."""
    metrics: tuple[str, ...]
    """The task's metrics; the first is its headline."""
    validation_split: str = "validation"


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("matthews", "accuracy")),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}


def task_of(name: str | None, setting: str = "data.glue_task") -> GlueTask:
    if name not in TASKS:
        raise ConfigError(f"{setting} must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def is_regression(task: GlueTask) -> bool:
    return task.num_labels == 1


# --------------------------------------------------------------------------- metrics


def accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def _confusion(pred: list[int], gold: list[int]) -> tuple[int, int, int, int]:
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    return tp, tn, fp, fn


def f1(pred: list[int], gold: list[int]) -> float:
    tp, _, fp, fn = _confusion(pred, gold)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: list[int], gold: list[int]) -> float:
    tp, tn, fp, fn = _confusion(pred, gold)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def ranks(x: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    result = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(task: GlueTask, predictions: list, labels: list) -> dict[str, float]:
    """``{metric: value}`` for the task's metrics (predictions: class ids, or scores for regression)."""
    return {name: METRICS[name](predictions, labels) for name in task.metrics}
