"""``stanceserve train --compare RUN...``: several training runs side by side, from their saved logs.

Each run folder holds the ``training_metrics.json`` that :func:`training.trainers.train_adapter`
writes (every logged optimiser step with its wall time, the total time, the hyperparameters).
:func:`load_run` reads one; :func:`compare_table` gives one row per run (final loss, final
reward margin, accuracy, time per step, total time); :func:`plot_compare` overlays the curves
(loss, DPO reward margin, accuracy, seconds per step, all against the optimiser step) in one
PNG; :func:`write_compare_markdown` writes the table as Markdown. Nothing is trained or
evaluated here.

"accuracy" is TRL's ``rewards/accuracies`` for DPO runs (fraction of pairs whose chosen answer
gets the larger implicit reward) and ``mean_token_accuracy`` for SFT runs (next-token accuracy
on the completions); the table names which one each row shows.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METRICS_FILE = "training_metrics.json"


class RunError(ValueError):
    """A run folder without a readable ``training_metrics.json``."""


def load_run(path: Path) -> dict[str, Any]:
    """The metrics of one run: ``path`` is a run folder or its ``training_metrics.json``.

    Returns:
        The file's content plus ``"run"`` (the folder's path as given).

    Raises:
        RunError: missing file, not JSON, or no ``steps`` list.
    """
    path = Path(path)
    file = path if path.is_file() else path / METRICS_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: no {METRICS_FILE} (not a stanceserve training run)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{file}: unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise RunError(f"{file}: no 'steps' list")
    data["run"] = str(path if path.is_dir() else path.parent)
    return data


def _accuracy_key(run: dict[str, Any]) -> str:
    return "rewards/accuracies" if run.get("method") == "dpo" else "mean_token_accuracy"


def method_label(run: dict[str, Any]) -> str | None:
    """The run's method as the table shows it: ``dpo + RPO (alpha)`` for DPO with the chosen answers' NLL added
    (``sft_weight`` alpha > 0, the RPO objective), else the method as recorded (``dpo``, ``sft``)."""
    method = run.get("method")
    alpha = (run.get("hyperparameters") or {}).get("sft_weight")
    if method == "dpo" and isinstance(alpha, (int, float)) and alpha > 0:
        return f"dpo + RPO ({alpha:g})"
    return method


def compare_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: ``run, name, method`` (:func:`method_label`), ``steps, final_loss, final_reward_margin, accuracy, accuracy_metric,
    time_per_step_s (median of the logged step times, seconds), total_time_s, rows`` (dataset rows), ``device, dtype``
    (where the run trained, from its ``machine``; None when not recorded)."""
    rows = []
    for r in runs:
        steps = r["steps"]
        last = steps[-1] if steps else {}
        times = [s["step_time_s"] for s in steps if isinstance(s.get("step_time_s"), (int, float))]
        rows.append({
            "run": r["run"], "name": r.get("name"), "method": method_label(r), "steps": len(steps),
            "final_loss": last.get("loss"),
            "final_reward_margin": last.get("rewards/margins"),
            "accuracy": last.get(_accuracy_key(r)), "accuracy_metric": _accuracy_key(r),
            "time_per_step_s": statistics.median(times) if times else r.get("time_per_step_s"),
            "total_time_s": r.get("total_time_s"),
            "rows": (r.get("dataset") or {}).get("rows"),
            "device": (r.get("machine") or {}).get("device"), "dtype": (r.get("machine") or {}).get("dtype"),
        })
    return rows


def plot_compare(runs: list[dict[str, Any]], path: Path, *, title: str = "training runs") -> Path:
    """Overlaid curves of every run (loss, reward margin, accuracy, seconds per step vs optimiser step) in one PNG."""
    import matplotlib  # [train] extra: kept out of the server (and the backend is chosen before pyplot loads)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
              (None, "accuracy"), ("step_time_s", "seconds per step")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for r in runs:
        label = Path(r["run"]).name or r.get("name") or r["run"]
        steps = [s.get("step") for s in r["steps"]]
        for ax, (key, _) in zip(axes[0], panels):
            k = key or _accuracy_key(r)
            ys = [s.get(k) for s in r["steps"]]
            if any(isinstance(y, (int, float)) for y in ys):
                ax.plot(steps, [y if isinstance(y, (int, float)) else float("nan") for y in ys], marker=".",
                        label=label)
    for ax, (_, name) in zip(axes[0], panels):
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


COLUMNS = ("run", "method", "steps", "final loss", "final reward margin", "accuracy", "s / step", "total s",
           "device, dtype")


def table_cells(row: dict[str, Any]) -> list[str]:
    """The row as the table's strings, in :data:`COLUMNS` order."""
    acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f} ({row['accuracy_metric']})"
    return [Path(row["run"]).name or row["run"], str(row["method"]), str(row["steps"]), _fmt(row["final_loss"], 4),
            _fmt(row["final_reward_margin"]), acc, _fmt(row["time_per_step_s"], 2), _fmt(row["total_time_s"], 1),
            f"{row.get('device') or 'unknown'}, {row.get('dtype') or 'unknown'}"]


def write_compare_markdown(path: Path, rows: list[dict[str, Any]], png: Path | None, command: str | None = None) -> Path:
    """The comparison table (and the PNG, if given, linked relative to ``path``) as Markdown."""
    lines = ["# Training runs compared", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    lines += ["", "s / step: median wall time of a logged optimiser step on the run's machine; accuracy: TRL's "
              "rewards/accuracies (DPO) or mean_token_accuracy (SFT) at the last step."]
    if png is not None:
        rel = Path(png).name if Path(png).parent == Path(path).parent else str(png)
        lines += ["", f"![curves]({rel})"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
