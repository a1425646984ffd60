"""The training tasks, one per model family (the contract: :mod:`shapeflow.train.task`).

``task:`` in an experiment file is a key of :data:`TASKS`.
"""

from __future__ import annotations

from shapeflow.train import task_dit, task_grid, task_sparse, task_toy, task_vecset
from shapeflow.train.task import Task

TASKS: dict[str, Task] = {t.name: t for t in (task_toy.TASK, task_vecset.TASK, task_grid.TASK, task_sparse.TASK,
                                              *task_dit.TASKS)}
