"""stagewise: pipeline-parallel training for PyTorch, with schedules as data."""

__version__ = "0.1.0"
