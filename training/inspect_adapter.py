"""Where does a LoRA adapter change the base model, and by how much?

:func:`adapter_update_norms` reads a peft LoRA adapter folder through the server's own
reader (:func:`app.registry.peft_reader.read_peft_adapter`: ``adapter_config.json`` +
``adapter_model.safetensors``, read once) and gives, for each targeted linear module, the
Frobenius norm of its weight update ``delta_W = scaling * B @ A`` (LoRA, Hu et al. 2021,
arXiv:2106.09685; peft ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA, Kalajdzievski 2023, arXiv:2312.03732; ``rank_pattern`` / ``alpha_pattern`` are
honoured through :func:`app.registry.peft_reader.module_scaling`). :func:`norms_table`
and :func:`plot_heatmap` lay the norms out as layers x projections.

This module reads no file itself (no JSON or safetensors parsing of its own) and needs no
base model (shapes are not checked against one: use
:func:`app.registry.validation.validate_adapter` for that). It refuses the same
non-plain-LoRA configs and tensors the server refuses
(:func:`app.registry.validation.config_problems` and
:func:`~app.registry.validation.tensor_problems`: DoRA, LoRA biases, ...), whose update is
not ``scaling * B @ A``. A norm says how large an update is, not what it does: compare
modules of one adapter, or adapters of one base model trained alike.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from app.registry.peft_reader import CONFIG_FILE, MODEL_FILE, module_scaling, read_peft_adapter
from app.registry.validation import config_problems, tensor_problems

logger = logging.getLogger(__name__)

# "...layers.3.self_attn.q_proj", "transformer.h.3.attn.c_attn", "blocks.3.fc1"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# Display order of common projection names; others follow alphabetically.
_PROJECTION_ORDER = [
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "dense",
    "gate_proj", "up_proj", "gate_up_proj", "down_proj", "fc1", "fc2",
]  # fmt: skip
#: Rank accepted when reading a config here (the server's own limit is not our concern).
_MAX_RANK = 1 << 20


def lora_update_norm(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> float:
    """Frobenius norm of ``scaling * B @ A`` without forming the ``d_out x d_in`` product.

    ``||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T))``
    (cyclic trace; ``A A^T`` is symmetric, so the trace of the product is the sum of the
    element-wise product). Cost ``O(r^2 (d_in + d_out))`` instead of ``O(r d_in d_out)``;
    computed in float64.

    Args:
        A: ``lora_A`` weight, shape ``[r, d_in]``.
        B: ``lora_B`` weight, shape ``[d_out, r]``.
        scaling: the peft scaling of the module.

    Raises:
        ValueError: if the inner dimensions differ.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A [r, d_in] and B [d_out, r], got {list(A.shape)} and {list(B.shape)}")
    a, b = A.detach().to(torch.float64), B.detach().to(torch.float64)
    sq = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(float(scaling)) * math.sqrt(max(sq, 0.0))


def _layer_of(module: str) -> int | None:
    matches = _LAYER_RE.findall(module)
    return int(matches[-1]) if matches else None


def adapter_update_norms(adapter_dir: Path) -> list[dict[str, Any]]:
    """Norm of the weight update of every module a LoRA adapter targets.

    Args:
        adapter_dir: a peft adapter folder with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (pickle ``.bin`` weights are not read).

    Returns:
        One row per module, sorted by layer (modules outside numbered layers last) then
        module path: ``{"module": base-model path ("model.layers.0.self_attn.q_proj"),
        "layer": int or None, "projection": leaf name ("q_proj"; "self_attn.dense"-style
        parent.leaf when a leaf name repeats within a layer), "rank": r of the module,
        "scaling": float, "norm": ||scaling * B @ A||_F (float, same units as the weights)}``.

    Raises:
        FileNotFoundError: if either file is missing.
        app.errors.AdapterValidationError: for a file the reader cannot read (see
            :func:`app.registry.peft_reader.read_peft_adapter`) or a config the server
            would refuse (see :func:`app.registry.validation.config_problems`).
        ValueError: for tensors that are not ``lora_A`` / ``lora_B`` weights, a repeated
            factor, an A without its B, no LoRA tensor at all (see
            :func:`app.registry.validation.tensor_problems`; the message is the problem's),
            or factor shapes that do not fit together.
    """
    adapter_dir = Path(adapter_dir)
    for p in (adapter_dir / CONFIG_FILE, adapter_dir / MODEL_FILE):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found")
    adapter = read_peft_adapter(adapter_dir)
    refused = config_problems(adapter.config, max_rank=_MAX_RANK)
    if refused:
        raise refused[0].error()
    refused = tensor_problems(adapter)
    if refused:
        raise ValueError(str(refused[0]))

    rows = []
    for module, pair in adapter.tensors.items():
        A, B = pair.A, pair.B
        r, scaling = module_scaling(adapter.config, module)
        if A.shape[0] != r:
            logger.warning("module %s: lora_A has rank %d but the config says %d", module, A.shape[0], r)
        rows.append(
            {
                "module": module,
                "layer": _layer_of(module),
                "projection": module.rsplit(".", 1)[-1],
                "rank": int(A.shape[0]),
                "scaling": float(scaling),
                "norm": lora_update_norm(A, B, scaling),
            }
        )
    # Disambiguate leaf names that repeat within a layer (attn.dense vs mlp.dense).
    seen: dict[tuple[int | None, str], int] = {}
    for row in rows:
        seen[(row["layer"], row["projection"])] = seen.get((row["layer"], row["projection"]), 0) + 1
    for row in rows:
        if seen[(row["layer"], row["projection"])] > 1:
            row["projection"] = ".".join(row["module"].split(".")[-2:])
    rows.sort(key=lambda r: (r["layer"] is None, r["layer"] if r["layer"] is not None else 0, r["module"]))
    logger.debug("adapter %s: %d modules", adapter_dir, len(rows))
    return rows


def _grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(row labels, projection columns, {(row label, projection): norm})."""

    def label(row):
        if row["layer"] is not None:
            return str(row["layer"])
        parent = row["module"].rsplit(".", 1)[0] if "." in row["module"] else row["module"]
        return parent

    labels: list[str] = []
    projections: set[str] = set()
    cells: dict[tuple[str, str], float] = {}
    for row in rows:
        lab = label(row)
        if lab not in labels:
            labels.append(lab)
        projections.add(row["projection"])
        cells[(lab, row["projection"])] = float(row["norm"])
    order = {p: i for i, p in enumerate(_PROJECTION_ORDER)}
    cols = sorted(projections, key=lambda p: (order.get(p.rsplit(".", 1)[-1], len(order)), p))
    return labels, cols, cells


def norms_table(rows: list[dict[str, Any]], title: str | None = "LoRA update norms ||scaling * B A||_F"):
    """A :class:`rich.table.Table` of :func:`adapter_update_norms` rows.

    One table row per layer (modules outside numbered layers get a row labelled with their
    parent path), a first ``layer`` column, then one column per projection (``q_proj``,
    ``k_proj``, ... in the usual order); cells show the norm to 4 significant digits, or
    ``-`` where the adapter does not target that module.
    """
    labels, cols, cells = _grid(rows)
    table = Table(title=title)
    table.add_column("layer", justify="right", style="bold")
    for c in cols:
        table.add_column(c, justify="right")
    for lab in labels:
        table.add_row(lab, *[f"{cells[(lab, c)]:.4g}" if (lab, c) in cells else "-" for c in cols])
    return table


def plot_heatmap(rows: list[dict[str, Any]], png_path: Path, title: str) -> Path:
    """Draw :func:`adapter_update_norms` rows as a layers x projections heatmap PNG.

    Rows are layers (top: layer 0), columns projections; untargeted cells are blank; a
    colorbar gives ``||scaling * B A||_F``; values are written in the cells when the grid
    has at most 400 cells. Uses matplotlib's Agg canvas directly (no pyplot, no global
    backend change). Parent folders are created.

    Returns:
        ``png_path``.

    Raises:
        ValueError: if ``rows`` is empty.
    """
    if not rows:
        raise ValueError("no modules to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # [train] extra: kept out of the server
    from matplotlib.figure import Figure

    labels, cols, cells = _grid(rows)
    data = np.full((len(labels), len(cols)), np.nan)
    for i, lab in enumerate(labels):
        for j, c in enumerate(cols):
            if (lab, c) in cells:
                data[i, j] = cells[(lab, c)]

    width = min(2.0 + 0.9 * len(cols), 24.0)
    height = min(1.8 + 0.35 * len(labels), 40.0)
    fig = Figure(figsize=(max(width, 5.0), max(height, 3.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(r"$\|\mathrm{scaling}\cdot BA\|_F$")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if data.size <= 400:
        finite = data[np.isfinite(data)]
        mid = float((finite.min() + finite.max()) / 2) if finite.size else 0.0
        for i in range(len(labels)):
            for j in range(len(cols)):
                if np.isfinite(data[i, j]):
                    ax.text(
                        j, i, f"{data[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if data[i, j] > mid else "white",
                    )  # fmt: skip
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    logger.debug("heatmap written to %s", png_path)
    return png_path
