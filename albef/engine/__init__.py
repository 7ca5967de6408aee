"""The training engine: one loop for every task, schedules, optimizer, logging.
The task contract (`Task`) is albef/tasks/base.py."""

from albef.engine.trainer import PREEMPTED_EXIT_CODE, Trainer, TrainingError, train

__all__ = ["PREEMPTED_EXIT_CODE", "Trainer", "TrainingError", "train"]
