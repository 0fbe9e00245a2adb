"""The end-to-end alignment demo (`fastllm demo`): a task with a ground-truth reward, every stage, a report."""
from .pipeline import FULL, REDUCED, DemoSizes, add_arguments, main, run_demo
from .task import AdditionTask

__all__ = ["AdditionTask", "DemoSizes", "FULL", "REDUCED", "run_demo", "add_arguments", "main"]
