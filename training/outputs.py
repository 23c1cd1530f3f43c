"""Where the training commands write, and the rule that they never overwrite what the user did not name.

Every default output lies under :data:`RUNS` (``runs/`` in the working folder), never in the package's own
folders (``adapters/``, ``docs/``, ``training/data/``): :func:`default_out` builds those paths. An output that
exists already is kept: :func:`check_file` and :func:`check_dir` refuse it, before any work is done, with a
message naming the path and ``--overwrite``, unless the command was given ``--overwrite``.

This module only looks at paths; it creates and removes nothing.
"""

from __future__ import annotations

from pathlib import Path

#: The folder every default output goes under, relative to the working folder.
RUNS = Path("runs")


class OutputExistsError(Exception):
    """An output path exists and ``--overwrite`` was not given; the message says what to do."""


def default_out(*parts: str) -> Path:
    """``runs/<parts...>``: the default output path of a command (e.g. ``default_out("eval", "x.md")``)."""
    return RUNS.joinpath(*parts)


def _refuse(path: Path, what: str, option: str) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists ({what}); it is kept: pass --overwrite to replace it, "
                             f"or give another {option}")


def check_file(path: Path, *, overwrite: bool, option: str = "--out") -> Path:
    """``path``, after checking that writing it replaces nothing unasked.

    Raises:
        OutputExistsError: ``path`` exists (as a file, a folder or a link) and ``overwrite`` is false.
    """
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise _refuse(path, "a folder" if path.is_dir() else "a file", option)
    return path


def check_dir(path: Path, *, overwrite: bool, option: str = "--out") -> Path:
    """``path``, a folder to write into, after checking that it is missing or empty (or ``overwrite`` is set).

    Raises:
        OutputExistsError: ``path`` is a file, or a folder with anything in it, and ``overwrite`` is false;
            a file is refused even with ``overwrite`` (a folder cannot replace it).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a folder; give another {option}")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise _refuse(path, "a folder that is not empty", option)
    return path
