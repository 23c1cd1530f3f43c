"""Finding the folder of an adapter given on the command line: a path, a name in the adapter store, or a shipped adapter.

``stanceserve eval`` (when it loads the model itself, without ``--url``) and ``stanceserve export-blend``
take each adapter as a folder path or as a name. :func:`resolve_adapter` tries, in this order:

1. the path itself, when it is a peft folder (holds ``adapter_config.json``);
2. ``<store>/<name>``: the store is ``--adapters-dir`` or, by default, the one the server uses
   (:attr:`app.config.Settings.adapters_dir`: ``$STANCESERVE_ADAPTERS_DIR``, else
   :func:`app.config.default_adapters_dir`, ``$XDG_DATA_HOME/stanceserve/adapters``);
3. ``<shipped>/<name>``: the adapters shipped with stanceserve, found by
   :func:`app.registry.seed.shipped_adapters_dir` (the checkout's ``adapters/``, else
   ``<sys.prefix>/share/stanceserve/adapters``), so the shipped stances work before any server has
   seeded a store.

It only checks that ``adapter_config.json`` is there: reading and validating the adapter is
:mod:`app.registry.validation`'s. It never asks a server (with ``--url``, names are the server's).
The ``app.registry`` imports happen inside :func:`resolve_adapter`, so building the CLI's help stays
free of torch.
"""

from __future__ import annotations

from pathlib import Path

from app.config import ENV_PREFIX, Settings, default_adapters_dir
from app.errors import AdapterLookupError
from app.registry import seed
from app.registry.validation import NAME_RE

#: The file that makes a folder a peft adapter folder, for this lookup.
_MARKER = "adapter_config.json"


def default_store() -> Path:
    """The configured adapter store, ``Settings().adapters_dir`` (from the environment; creates nothing).

    Raises:
        pydantic.ValidationError: a ``STANCESERVE_*`` environment variable holds an invalid value.
    """
    return Settings().adapters_dir or default_adapters_dir()  # Settings fills the default in; this is for typing


def store_help() -> str:
    """Where adapter names are looked up, in words, for an ``--adapters-dir`` option's help (from :class:`Settings`)."""
    return (f"Adapter store searched for adapter names, before the adapters shipped with stanceserve "
            f"(default: the server's store, ${ENV_PREFIX}{'adapters_dir'.upper()} if set, else {default_adapters_dir()}).")


def resolve_adapter(adapter: str | Path, adapters_dir: Path | None = None) -> Path:
    """The folder of ``adapter``: the path itself, else ``<store>/<name>``, else ``<shipped adapters>/<name>``.

    Args:
        adapter: a folder path (absolute, or relative to the working directory) or an adapter name.
        adapters_dir: the store searched for names (default: :func:`default_store`).

    Returns:
        The first of the candidates that holds ``adapter_config.json`` (as given, not made absolute).

    Raises:
        app.errors.AdapterLookupError: none does; its message names every folder looked at, in order
            (a store or shipped folder is searched only for a valid adapter name, see
            :data:`app.registry.validation.NAME_RE`).
    """
    path = Path(adapter)
    if (path / _MARKER).is_file():
        return path
    searched = [("the path", str(path))]
    name = str(adapter)
    if NAME_RE.fullmatch(name) is None:
        raise AdapterLookupError(name, searched, note="not a valid adapter name, so no store was searched")
    store = Path(adapters_dir) if adapters_dir is not None else default_store()
    candidate = store / name
    if (candidate / _MARKER).is_file():
        return candidate
    searched.append(("the adapter store", str(candidate)))
    shipped = seed.shipped_adapters_dir()  # looked up at call time (tests replace it)
    if shipped is not None:
        candidate = shipped / name
        if (candidate / _MARKER).is_file():
            return candidate
        searched.append(("the shipped adapters", str(candidate)))
        note = None
    else:
        note = f"no shipped adapters found (beside the app package, or in <sys.prefix>/{seed.INSTALLED_SUBDIR})"
    raise AdapterLookupError(name, searched, note=note)
