"""Synthetic task datasets for training and evaluating stances (adapters).

Each task module generates problems with an exact ground truth, turns them into
SFT rows (chat messages) and eval rows (prompt plus expected answer), and scores
a model's free-text answers. Modules: :mod:`training.tasks.scheduling`.
"""
