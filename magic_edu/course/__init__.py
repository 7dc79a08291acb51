"""Helpers of the course notebooks: exercise checkers and the notebook runner."""
