"""Stance datasets: JSONL formats for SFT and DPO, loaded with errors that name file, line and field.

Formats (one JSON object per line; blank lines are skipped):

* SFT, chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  with at least one user turn and ending in an assistant turn.
* SFT, plain: ``{"prompt": "...", "completion": "..."}`` (the prompt becomes a user turn).
* DPO: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (the prompt becomes a user turn,
  chosen and rejected are assistant answers to it).

Rows are turned into TRL's conversational format, so the trainers apply the
model's own chat template. This module reads files only: no tokenisation, no
training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Method = Literal["sft", "dpo"]
ROLES = {"system", "user", "assistant"}


class DatasetError(ValueError):
    """A malformed dataset file.

    Attributes:
        path: the file.
        line: 1-based line number, or ``None`` for whole-file problems.
        field: the missing or bad field, if any.
    """

    def __init__(self, path: Path, line: int | None, message: str, field: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class StanceDataset:
    """Rows ready for TRL, with provenance.

    Attributes:
        rows: TRL conversational rows: SFT ``{"prompt": [turns before], "completion": [last assistant
            turn]}`` (so the loss is on the completion only); DPO ``{"prompt": [user turn],
            "chosen": [assistant turn], "rejected": [assistant turn]}``.
        method: ``"sft"`` or ``"dpo"``.
        sha256: hex digest of the file's bytes.
        path: the file.
    """

    rows: list[dict[str, Any]]
    method: Method
    sha256: str
    path: Path

    def __len__(self) -> int:
        return len(self.rows)


def _text(obj: dict, key: str, path: Path, line: int) -> str:
    if key not in obj:
        raise DatasetError(path, line, f"missing field {key!r}", key)
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise DatasetError(path, line, f"field {key!r} must be a non-empty string", key)
    return v


def _messages(obj: dict, path: Path, line: int) -> list[dict[str, str]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DatasetError(path, line, "field 'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DatasetError(path, line, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise DatasetError(path, line, f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}",
                               f"messages[{i}].role")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DatasetError(path, line, f"messages[{i}].content must be a non-empty string",
                               f"messages[{i}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DatasetError(path, line, "the last message must be the assistant's (what is learned)", "messages")
    if not any(m["role"] == "user" for m in out):
        raise DatasetError(path, line, "messages need at least one user turn", "messages")
    return out


def parse_row(obj: Any, method: Method, path: Path, line: int) -> dict[str, Any]:
    """One JSON object -> one TRL row.

    Raises:
        DatasetError: the object lacks a field of ``method``'s format or has one of the wrong type.
    """
    if not isinstance(obj, dict):
        raise DatasetError(path, line, "each line must be a JSON object")
    if method == "dpo":
        prompt = _text(obj, "prompt", path, line)
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": _text(obj, "chosen", path, line)}],
            "rejected": [{"role": "assistant", "content": _text(obj, "rejected", path, line)}],
        }
    if "messages" in obj:
        msgs = _messages(obj, path, line)
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    if "prompt" in obj or "completion" in obj:
        return {
            "prompt": [{"role": "user", "content": _text(obj, "prompt", path, line)}],
            "completion": [{"role": "assistant", "content": _text(obj, "completion", path, line)}],
        }
    raise DatasetError(path, line, "an SFT row needs 'messages', or 'prompt' and 'completion'", "messages")


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line of a JSONL file.

    Raises:
        DatasetError: unreadable or non-UTF-8 file, or invalid JSON (with its line number).
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DatasetError(path, None, f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(path, None, f"not UTF-8 text ({e})") from e
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(path, i, f"invalid JSON: {e.msg} (column {e.colno})") from e


def load_dataset(path: Path | str, method: Method) -> StanceDataset:
    """Read and validate a JSONL dataset for ``method``.

    Raises:
        DatasetError: unreadable file, invalid JSON (with line number), a malformed row, or no rows.
    """
    path = Path(path)
    rows = [parse_row(obj, method, path, i) for i, obj in _json_lines(path)]
    if not rows:
        raise DatasetError(path, None, "no rows")
    return StanceDataset(rows, method, hashlib.sha256(path.read_bytes()).hexdigest(), path)


def load_probes(path: Path | str) -> list[str]:
    """Prompts of a probe file: JSONL rows with a ``prompt`` field (other fields ignored).

    Raises:
        DatasetError: as :func:`load_dataset`.
    """
    path = Path(path)
    out = []
    for i, obj in _json_lines(path):
        if not isinstance(obj, dict):
            raise DatasetError(path, i, "each line must be a JSON object")
        out.append(_text(obj, "prompt", path, i))
    if not out:
        raise DatasetError(path, None, "no probes")
    return out


def load_reference_answers(path: Path | str) -> list[tuple[str, str]]:
    """``(user prompt, target answer)`` pairs of a training file, to calibrate stance scorers.

    The target answer is a DPO row's ``chosen`` side, or an SFT row's completion (last
    assistant turn; the prompt is then the last user turn). The format is read per row.

    Raises:
        DatasetError: as :func:`load_dataset`.
    """
    path = Path(path)
    out = []
    for i, obj in _json_lines(path):
        method: Method = "dpo" if isinstance(obj, dict) and "chosen" in obj else "sft"
        row = parse_row(obj, method, path, i)
        user = [t["content"] for t in row["prompt"] if t["role"] == "user"][-1]
        out.append((user, row["chosen" if method == "dpo" else "completion"][0]["content"]))
    if not out:
        raise DatasetError(path, None, "no rows")
    return out


#: The datasets shipped with the package.
DATA_DIR = Path(__file__).resolve().parent / "data"
STANCES = ("curious-uncertainty", "confident-expertise", "engaged-difficulty")


def stance_files(stance: str) -> tuple[Path, Path]:
    """``(train.dpo.jsonl, probes.jsonl)`` of a shipped stance."""
    d = DATA_DIR / "stances" / stance
    return d / "train.dpo.jsonl", d / "probes.jsonl"
