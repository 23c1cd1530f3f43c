"""docker-compose.yml, checked without Docker: the Compose Specification's JSON schema, then what it must wire up.

``docker compose config`` needs the compose plugin, which this machine's docker CLI lacks (there is no daemon
either), so the file is validated against the compose-spec schema that check-jsonschema vendors
(``--builtin-schema vendor.compose-spec``), and the wiring (profiles, GPU reservation, Prometheus target,
Grafana provisioning paths) is checked here by reading the files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import REPO

COMPOSE = REPO / "docker-compose.yml"


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    assert Path(exe).exists(), "check-jsonschema not installed: pip install -e '.[dev]'"
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec():
    done = _check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_catches_a_broken_file(tmp_path):
    broken = COMPOSE.read_text().replace("count: all", "count: [everything]")
    assert broken != COMPOSE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    assert _check_jsonschema(tmp_path / "docker-compose.yml").returncode != 0


def test_cpu_by_default_gpu_in_its_profile(compose):
    cpu, gpu = compose["services"]["stanceserve"], compose["services"]["stanceserve-gpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["TARGET"] == "cpu"
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["TARGET"] == "cuda"
    env_file = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    assert env_file["COMPOSE_PROFILES"] == "cpu"  # what a plain `docker compose up` starts
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "stanceserve" in gpu["networks"]["default"]["aliases"]  # the name Prometheus scrapes
    for server in (cpu, gpu):
        assert any(v.endswith(":/data") for v in server["volumes"])
        assert "8000:8000" in server["ports"]
        assert server["environment"]["STANCESERVE_ADMIN_KEY"].startswith("${")  # from the shell, never a value
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, name


def test_prometheus_and_grafana_are_wired_to_the_files_in_deploy(compose):
    services = compose["services"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                mounts[source] = target
    prom_cfg = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    (job,) = prom_cfg["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["stanceserve:8000"] and job["metrics_path"] == "/metrics"

    prov = REPO / "deploy" / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert source["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "stanceserve.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert (REPO / "deploy" / "grafana" / "dashboards" / "stanceserve.json").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/stanceserve.json"
