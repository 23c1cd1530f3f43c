"""The ``--quick`` presets: a first ``train``, ``eval`` and ``eval --sweep`` that finish in about a minute.

Each preset is a set of option values, applied to the options the user did not give on the command line
(:func:`apply`: an option given explicitly always wins). They are sized for the embedded SmolLM2-135M on two
CPU cores and still show the stance moving:

* :data:`TRAIN`: 8 DPO steps of one pair at a high learning rate on the shipped ``curious-uncertainty``
  preference data (:data:`QUICK_DATA`, when no ``--data`` is given), the reference log-probabilities computed
  per step rather than for the whole dataset first, no gradient checkpointing: the DPO loss falls below log 2 and the reward margin
  (chosen minus rejected) rises within those steps. The full run's cost is unchanged (no ``--quick``).
* :data:`EVAL`: the first 8 held-out probes of the stance (its shipped ``probes.jsonl`` when no ``--probes`` is
  given), 48 tokens per answer.
* :data:`SWEEP`: two shipped stances, three weights and three interpolation points, 3 probes per stance, 32
  tokens per answer, 200 bootstrap resamples.

The full runs keep their documented cost; only these presets are small. This module holds data and one pure
function; the commands (:mod:`training.cli`) apply them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STANCE_DATA = Path(__file__).resolve().parent / "data" / "stances"

#: The stance a quick ``train`` learns when no ``--data`` is given.
QUICK_STANCE = "curious-uncertainty"
#: Its shipped preference data.
QUICK_DATA = STANCE_DATA / QUICK_STANCE / "train.dpo.jsonl"

#: ``train --quick`` (TrainConfig fields).
TRAIN: dict[str, Any] = {"method": "dpo", "max_steps": 8, "batch_size": 2, "grad_accum": 1, "max_length": 192,
                         "lr": 1e-3, "precompute_ref": False, "gradient_checkpointing": False}
#: ``eval --quick``: ``probe_limit`` keeps the first N probes.
EVAL: dict[str, Any] = {"max_tokens": 48, "probe_limit": 8}
#: ``eval --sweep --quick``.
SWEEP: dict[str, Any] = {"stances": "curious-uncertainty,confident-expertise", "weights": "0,0.5,1",
                         "ts": "0,0.5,1", "probes_per_stance": 3, "max_tokens": 32, "resamples": 200}


def apply(preset: Mapping[str, Any], values: dict[str, Any], given: Callable[[str], bool]) -> dict[str, Any]:
    """``values`` with each option of ``preset`` set, unless ``given(name)`` says the user gave it.

    Returns the same dict (changed in place), for chaining. Names in ``preset`` that are not in ``values`` are
    added.
    """
    for name, value in preset.items():
        if not given(name):
            values[name] = value
    return values
