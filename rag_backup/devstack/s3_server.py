"""An S3 server: moto in server mode (real HTTP, the S3 protocol), bound to 127.0.0.1.

No MinIO server binary can be installed on these machines; moto stands in for it. It keeps
everything in memory, so a fresh start loses the buckets' contents (the stack then re-seeds).
moto accepts any credentials; the stack still generates a key pair and hands it out, so client
code is written as it will run against MinIO.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from rag_backup.devstack.base import Launch, Service, base_env
from rag_backup.devstack.settings import S3_BUCKETS, S3_REGION, S3Settings

HOST = "127.0.0.1"


class S3Service(Service):
    name = "s3"
    startup_timeout_s = 60.0
    persistent = False

    def __init__(self, root: Path, state) -> None:
        super().__init__(root, state)

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def configure(self, ports: dict[str, int]) -> None:
        """moto takes its bind address and port on the command line; nothing to write."""

    def launch(self) -> Launch:
        env = base_env()
        env["PYTHONUNBUFFERED"] = "1"
        return Launch(
            argv=[
                sys.executable,
                "-m",
                "moto.server",
                "-H",
                HOST,
                "-p",
                str(self.port),
            ],
            env=env,
            cwd=self.dir,
        )

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def probe(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as response:
                return response.status < 500
        except (
            urllib.error.HTTPError
        ) as exc:  # an S3 error document still means "it answers"
            return exc.code < 500

    def settings(self) -> S3Settings:
        return S3Settings(
            endpoint=self.endpoint,
            access_key=self.state.secret("s3_access_key"),
            secret_key=self.state.secret("s3_secret_key"),
            region=S3_REGION,
        )

    def after_start(self) -> None:
        """The production bucket layout: documents, models, backups."""
        client = self.settings().client()
        existing = {
            bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])
        }
        for bucket in S3_BUCKETS:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)

    def env(self) -> dict[str, str]:
        settings = self.settings()
        return {
            "RAG_S3_ENDPOINT": settings.endpoint,
            "RAG_S3_ACCESS_KEY": settings.access_key,
            "RAG_S3_SECRET_KEY": settings.secret_key,
            "RAG_S3_REGION": settings.region,
        }

    def describe(self) -> str:
        return f"port {self.port}, moto (in memory)"
