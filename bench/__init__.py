"""The benchmarks of a source checkout; not part of the installed ``stanceserve`` package.

- :mod:`bench.cli`: the multi-LoRA serving benchmark behind ``stanceserve bench`` (also
  ``python -m bench``), with :mod:`bench.models` (what is measured) and :mod:`bench.scenarios`
  (how); needs the ``[bench]`` extra.
- ``bench/http_load.py``: a script that loads a running server over HTTP.

The serving package never imports this one: :mod:`app.cli` imports :mod:`bench.cli` only when
``stanceserve bench`` runs, from the checkout that holds ``app/`` (or the working folder).
"""
