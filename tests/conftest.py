"""Shared test fixtures.

- ``s3_server``: moto's S3 server (server mode, so Ray workers, DataLoader workers and subprocesses
  reach it too) listening on 127.0.0.1 on a free port. One server per test session; each test that
  asks for the fixture gets the AWS/S3 environment variables set for its duration (dummy
  credentials, region, ``S3_ENDPOINT_URL`` for mosaicml-streaming, ``AWS_ENDPOINT_URL`` for boto3)
  and restored afterwards. Use ``s3_server.new_bucket()`` for a fresh, empty bucket per test.

Ray's workers get the tests' niceness (see below).

Triton kernels (``fractalgen.models.tiny_attention``) run in Triton's interpreter on the CPU: the
variable must be set before anything imports Triton, hence here, at import time.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
# Ray starts its workers at niceness 15: beside any busy process on a 2-core box they would get a few
# percent of a core and the Ray tests would crawl. The tests' workers run at the test's own priority
# (fractalgen.platform.ray_connect does the same for the local Ray of a real run).
os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))


@dataclass
class S3Server:
    """A running moto S3 server: ``endpoint_url`` is ``http://127.0.0.1:PORT``."""

    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):  # -> botocore S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_bucket(self, prefix: str = "test") -> str:
        """Create an empty bucket with a unique name and return the name (no ``s3://``)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(_moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> S3Server:
    """moto's S3 server with the environment pointing at it (restored after the test)."""
    empty = tmp_path_factory.mktemp("aws") / "none"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
        "S3_ENDPOINT_URL": _moto_server,
        "AWS_ENDPOINT_URL": _moto_server,
        "AWS_ENDPOINT_URL_S3": _moto_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE",):
        if key in os.environ:
            monkeypatch.delenv(key)
    return S3Server(endpoint_url=_moto_server, env=env)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_across_modules() -> Iterator[None]:
    """Each test module starts with no Ray in this process and leaves none behind: a command under
    test may start a local Ray (``fractalgen.platform.ray_connect``) and keep it, as the CLI does, and
    a later module must not depend on it, or find it where it checks that nothing started Ray."""
    _shutdown_ray()
    yield
    _shutdown_ray()


def _shutdown_ray() -> None:
    import sys

    ray = sys.modules.get("ray")  # never imports Ray for modules that do not use it
    if ray is not None and ray.is_initialized():
        ray.shutdown()
