"""The multi-LoRA serving benchmark behind ``stanceserve bench`` (see :mod:`app.bench.cli`)."""
