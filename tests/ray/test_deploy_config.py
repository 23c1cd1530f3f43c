"""deploy/ray/: the `serve run` config is valid for Ray Serve and builds the application it names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from app.config import Settings

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"


def test_serve_config_validates_and_its_args_are_settings():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'stanceserve[ray]'")
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    settings = Settings(**app.args)  # every arg is a settings field with a valid value
    assert settings.replicas == 2 and settings.ray_replica_gpus == 1
    assert set(app.args) <= set(Settings.model_fields)
    built = builder(app.args)
    assert type(built).__name__ == "Application"
