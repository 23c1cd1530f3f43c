"""What CI runs, read from its script and the Makefile: the make targets (prerequisites included) and scripts.

Reads text only; it runs nothing and expands no Makefile variables.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def _make_rules(makefile: str) -> dict[str, list[str]]:
    """Target -> prerequisites of every explicit rule of a Makefile (no variables expanded)."""
    rules: dict[str, list[str]] = {}
    for line in makefile.splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-]+(?:\s+[A-Za-z0-9_.$()/-]+)*)\s*:(?![=:])\s*(.*)$", line)
        if m and not line.startswith("\t"):
            for target in m.group(1).split():
                rules.setdefault(target, []).extend(m.group(2).split())
    return rules


def ci_steps(ci_script: str, makefile: str) -> tuple[set[str], set[str]]:
    """What CI runs: the make targets (with every prerequisite target) and the scripts (by file name)."""
    rules = _make_rules(makefile)
    targets: set[str] = set()
    scripts: set[str] = set()
    for line in ci_script.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = shlex.split(line)
        if words[0] == "make":
            todo = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            while todo:
                t = todo.pop()
                if t not in targets:
                    targets.add(t)
                    todo.extend(p for p in rules.get(t, []) if p in rules)
        elif words[0] == "bash" and len(words) > 1:
            scripts.add(Path(words[1]).name)
        elif words[0].endswith(".sh"):
            scripts.add(Path(words[0]).name)
    return targets, scripts
