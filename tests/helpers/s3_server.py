"""A real S3-compatible HTTP server on localhost for the object-storage tests: moto's server mode
(`python -m moto.server`), started on a free port in a process of its own (so the ranks the tests
fork never hold its socket). moto keeps its buckets in memory: `restart` stops the process,
starts a new one on the same port and the caller uploads again. With `auth=True` only the access
key made here through IAM is accepted, so a wrong secret is refused as a real server refuses it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fitscale.runtime.local import free_port

REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass
class S3Server:
    """A moto server at http://127.0.0.1:`port`, with `bucket` created and credentials to use it."""

    bucket: str = "latents"
    auth: bool = False
    port: int = field(default_factory=free_port)
    access_key: str = "AKIATESTFITSCALE0000"
    secret_key: str = "fitscale-test-secret-0123456789abcdefXYZ"

    def __post_init__(self):
        self.server = None
        self.start()
        import boto3
        import requests

        anyone = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        # moto keeps its state per process, not per server: start from nothing, authentication off
        requests.post(f"{self.endpoint}/moto-api/reset", timeout=10)
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        if self.auth:  # the next 3 requests may be unsigned: they make the only valid key
            requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"3", timeout=10)
            iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, **anyone)
            iam.create_user(UserName="fitscale")
            iam.put_user_policy(UserName="fitscale", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
            key = iam.create_access_key(UserName="fitscale")["AccessKey"]
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=self.bucket)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **changes: str) -> dict[str, str]:
        """What a run gets from its environment: endpoint and credentials (never from the recipe)."""
        values = {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        return {**values, **changes}

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def start(self, log: Path | None = None) -> None:
        """Start the server process and wait until it accepts connections; with `log`, its request
        log (one line per request: method, path, status) goes to that file."""
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        errors = subprocess.DEVNULL if log is None else open(log, "ab")  # noqa: SIM115 (the child holds it)
        self.server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        if log is not None:
            errors.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.server.poll() is not None:
                    raise RuntimeError(
                        f"moto server on port {self.port} exited with {self.server.returncode}"
                    ) from None
                time.sleep(0.1)
        raise TimeoutError(f"moto server on port {self.port} did not start in 60 s")

    def stop(self) -> None:
        """End the server process (its buckets go with it)."""
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set `values` in os.environ; returns what to restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
