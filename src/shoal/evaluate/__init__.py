"""Score models on tasks: the task format, metrics and constraints, a fast transformers backend, and evaluate()."""

from shoal.evaluate.runner import EvalResult, evaluate
from shoal.evaluate.task import Task, load_task

__all__ = ["EvalResult", "Task", "evaluate", "load_task"]
