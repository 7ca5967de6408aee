"""The training engine: one loop for every task, schedules, optimizer, logging."""

from albef.engine.trainer import PREEMPTED_EXIT_CODE, Task, Trainer, TrainingError, train

__all__ = ["PREEMPTED_EXIT_CODE", "Task", "Trainer", "TrainingError", "train"]
