"""Adapter stores: the real :class:`AdapterStore` sized for the tiny models, and a fake one for the engine.

:class:`FakeStore` serves adapter folders by name through the by-hand reader
(:func:`tests.factories.adapters.read_adapter`), so engine tests do not depend on the registry code.
"""

from __future__ import annotations

from pathlib import Path

from tests.factories.adapters import adapter_version, read_adapter
from tests.factories.models import shapes

MB = 1024 * 1024


def new_store(root: Path, arch: str = "llama", **kw):
    """An :class:`AdapterStore` at ``root`` for the tiny ``arch`` model (default ``max_rank`` 64, ``max_bytes`` 64 MB)."""
    from app.registry.store import AdapterStore

    kw.setdefault("max_rank", 64)
    kw.setdefault("max_bytes", 64 * MB)
    return AdapterStore(root, shapes(arch), **kw)


class FakeStore:
    """name -> adapter folder; enough of AdapterStore for the engine (``version`` is the API counter)."""

    def __init__(self, dirs):
        self.dirs = dict(dirs)
        self.version = {n: 1 for n in dirs}

    def get(self, name):
        from app.errors import AdapterNotFoundError
        from app.registry.adapter import AdapterRecord

        if name not in self.dirs:
            raise AdapterNotFoundError(name)
        digest = adapter_version(self.dirs[name], name).digest
        return AdapterRecord(name, self.version[name], 4, 8, [], 0, "", digest, 0.0, str(self.dirs[name]))

    def load_weights(self, record):
        return read_adapter(self.dirs[record.name], record.name)
