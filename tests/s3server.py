"""A real S3 API on 127.0.0.1 for tests: moto's server (``moto[server]``, the ``test`` extra),
in a thread of the test process, with one empty bucket. Nothing leaves the machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

BUCKET = "haqtune-test"
# Credentials the local server accepts; the variables stop the AWS SDK from looking
# for others (files, instance metadata on 169.254.169.254).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class S3Server:
    host: str
    port: int
    bucket: str

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the server as its S3 (``AWS_ENDPOINT_URL``)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def uri(self, path: str, *, endpoint_in_query: bool = False) -> str:
        """``s3://bucket/path``; with the endpoint in the URI's query instead of the environment."""
        uri = f"s3://{self.bucket}/{path}"
        return f"{uri}?endpoint_override={self.host}:{self.port}&scheme=http" if endpoint_in_query else uri

    def filesystem(self):
        """The bucket's filesystem, opened independently of haqtune (for checks)."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing",
                                       secret_key="testing", region="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket, sorted."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(f"{self.bucket}/{prefix}".rstrip("/"), recursive=True,
                                           allow_not_found=True)
        return sorted(info.path[len(self.bucket) + 1:] for info in self.filesystem().get_file_info(selector)
                      if info.type == pyarrow.fs.FileType.File)

    def read_bytes(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{self.bucket}/{key}") as stream:
            return stream.read()

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on a free port of 127.0.0.1, create the bucket, stop it after."""
    import logging

    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(host, port, BUCKET)
        pyarrow.fs.S3FileSystem(endpoint_override=s3.endpoint, access_key="testing", secret_key="testing",
                                region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield s3
    finally:
        server.stop()
