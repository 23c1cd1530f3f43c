"""Synthetic task datasets for training and evaluating stances (adapters).

Each task module generates problems with an exact ground truth, turns them into
SFT rows (chat messages) and eval rows (prompt plus expected answer), and scores
a model's free-text answers. Modules: :mod:`training.tasks.scheduling` (the meeting-room task),
:mod:`training.tasks.sweep_trace` (its sweep-line trace completions and strict parser) and
:mod:`training.tasks.scheduling_eval` (held-out scoring, train/test disjointness, the report).
"""
