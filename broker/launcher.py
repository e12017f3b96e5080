"""Start a private Mosquitto with the project's config on a free port, with generated credentials.

Used by the test fixture, `make bench` and the fleet simulation, so that all of them exercise the same
`edgecascade.conf` and `edgecascade.acl` a broker host runs.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from protocol.mqtt import BrokerAddress

Credentials = BrokerAddress

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent
BASE_CONFIG = CONFIG_DIR / "edgecascade.conf"
ACL_FILE = CONFIG_DIR / "edgecascade.acl"
SERVICE_USERS = ("cloud", "collector")
CERT_SCRIPT = CONFIG_DIR / "make-test-certs.sh"


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _require(binary: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise RuntimeError(
            f"{binary} not found: install it with `sudo apt-get install mosquitto mosquitto-clients`"
        )
    return path


def make_test_certs(directory: Path) -> Path:
    """A test CA and a localhost/127.0.0.1 server certificate in `directory` (broker/make-test-certs.sh)."""
    directory = Path(directory)
    result = subprocess.run(
        ["sh", str(CERT_SCRIPT), str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{CERT_SCRIPT.name} failed: {result.stderr.strip()}")
    return directory


class BrokerProcess:
    """A Mosquitto child process with its own config, password file, ACL and persistence directory.

    >>> with BrokerProcess() as broker:
    ...     creds = broker.credentials("cloud")
    """

    def __init__(
        self,
        workdir: Optional[Path] = None,
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        tls_dir: Optional[Path] = None,
        extra_config: str = "",
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgecascade-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or find_free_port(host)
        self.tls_dir = Path(tls_dir) if tls_dir else None
        if self.tls_dir is not None and not (self.tls_dir / "server.crt").exists():
            make_test_certs(self.tls_dir)  # tests and bench: a fresh test CA unless one is given
        self.tls_port = find_free_port(host) if tls_dir else None
        self.extra_config = extra_config
        self._passwords: Dict[str, str] = {}
        self._proc: Optional[subprocess.Popen] = None
        self.password_file = self.workdir / "passwd"
        self.config_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        for user in SERVICE_USERS:
            self._passwords[user] = secrets.token_urlsafe(12)
        self._write_passwords()
        self._write_config()

    # -- credentials -------------------------------------------------------------------------------
    def _write_passwords(self) -> None:
        passwd = _require("mosquitto_passwd")
        self.password_file.write_text("")
        self.password_file.chmod(0o600)
        for user, password in self._passwords.items():
            subprocess.run(
                [passwd, "-b", str(self.password_file), user, password], check=True, capture_output=True
            )

    def add_users(self, usernames: List[str]) -> None:
        """Create (or keep) users; a running broker reloads its password file on SIGHUP."""
        new = [u for u in usernames if u not in self._passwords]
        if not new:
            return
        passwd = _require("mosquitto_passwd")
        for user in new:
            self._passwords[user] = secrets.token_urlsafe(12)
            subprocess.run(
                [passwd, "-b", str(self.password_file), user, self._passwords[user]],
                check=True,
                capture_output=True,
            )
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)  # mosquitto reloads asynchronously in its main loop

    def credentials(self, username: str, *, tls: bool = False) -> Credentials:
        if username not in self._passwords:
            self.add_users([username])
        if tls:
            if self.tls_port is None or self.tls_dir is None:
                raise ValueError("this broker was started without tls_dir")
            return Credentials(
                self.host, self.tls_port, username, self._passwords[username], str(self.tls_dir / "ca.crt")
            )
        return Credentials(self.host, self.port, username, self._passwords[username])

    # -- process -----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        persistence = self.workdir / "persistence"
        persistence.mkdir(exist_ok=True)
        lines = [
            f"# generated by broker.launcher from {BASE_CONFIG}",
            BASE_CONFIG.read_text(),
            # Run as whoever launched us: started as root, mosquitto would otherwise drop to user
            # `mosquitto`, which cannot read this private workdir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"persistence_location {persistence}/",
            f"password_file {self.password_file}",
            f"acl_file {ACL_FILE}",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        if self.tls_dir is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_dir / 'ca.crt'}",
                f"certfile {self.tls_dir / 'server.crt'}",
                f"keyfile {self.tls_dir / 'server.key'}",
                "tls_version tlsv1.2",
            ]
        lines.append(self.extra_config)
        self.config_file.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> BrokerProcess:
        if self.running:
            return self
        self._proc = subprocess.Popen(
            [_require("mosquitto"), "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self.log_file.read_text() if self.log_file.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err}{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
                if self.tls_port is not None:
                    with socket.create_connection((self.host, self.tls_port), timeout=0.2):
                        pass
                logger.info("mosquitto listening on %s:%d (pid %d)", self.host, self.port, self._proc.pid)
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop: SIGTERM lets mosquitto write its persistence file."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): what a power cut does to a broker."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self) -> BrokerProcess:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
