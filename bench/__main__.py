"""``python -m bench``: the multi-LoRA benchmark of :mod:`bench.cli`, without the ``stanceserve`` command."""

from bench.cli import app

app(prog_name="python -m bench")
