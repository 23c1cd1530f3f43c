"""The Ray tests' cluster: a local Ray on loopback with 2 replicas of the tiny Llama, shared by the tests of a module.

Started once per test module (module scope) by the tests themselves and torn down after them. Skipped with
the reason when Ray Serve is not installed (the ``[ray]`` extra).
"""

from __future__ import annotations

import pytest

from tests.ray.cluster import RayService, start_service


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory) -> RayService:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'stanceserve[ray]'")
    with start_service(tmp_path_factory.mktemp("ray-store")) as service:
        yield service
