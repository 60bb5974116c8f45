"""Evaluation helpers: task loaders, answer extraction and scoring."""
