"""Start a private Mosquitto with the project's config on a free port, with generated credentials.

Used by the test fixture, `make bench`, the fleet simulation and `edgecascade broker`, so that all of them
exercise the same `edgecascade.conf`, `edgecascade.acl` and dynamic-security roles (`edgecascade-roles.json`,
see dynsec.py) a broker host runs.

Everything lives in the work directory: the generated mosquitto.conf, the plugin's account file, Mosquitto's
persistence, and `credentials.json` (0600: each account's password, the ports), which a later
`BrokerProcess` on the same directory reads back, so that a restarted broker keeps every password and port
and its clients simply reconnect.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from broker import dynsec
from protocol.ids import bridge_of, check_username, sensor_of, service_role
from protocol.mqtt import BrokerAddress, new_client

Credentials = BrokerAddress

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent
BASE_CONFIG = CONFIG_DIR / "edgecascade.conf"
ACL_FILE = CONFIG_DIR / "edgecascade.acl"
SERVICE_USERS = ("cloud", "collector")
CERT_SCRIPT = CONFIG_DIR / "make-test-certs.sh"


def find_free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port the OS has free, and the `count` - 1 after it too (a cell plan puts its brokers on port + 1
    + i: the OS vouches only for the one it hands out, and the next may be taken)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port + count <= 65536 and all(_bindable(host, p) for p in range(port + 1, port + count)):
            return port
    raise RuntimeError(f"no run of {count} free ports on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


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


def role_of(username: str) -> str:
    """The dynamic-security role of an account: `cloud`, `collector` (or their `-<x>` instances), `device`;
    a sensor account (`sensor-<device>`) and a site's bridge account (`bridge-<site>`) have a role of their
    own, named like them (`dynsec.sensor_role`, `dynsec.bridge_role`)."""
    if sensor_of(username) is not None or bridge_of(username) is not None:
        return username
    return service_role(username) or dynsec.DEVICE_ROLE


def _sensor_role(username: str) -> Optional[Dict[str, Any]]:
    """The role of its own that a sensor or bridge account gets (None: a role of the roles file)."""
    if bridge_of(username) is not None:
        return dynsec.bridge_role(role_of(username))
    device = sensor_of(username)
    return None if device is None else dynsec.sensor_role(role_of(username), device)


def _bound(username: str) -> Optional[bool]:
    """Sensors and bridges are bound to client id = username like devices (None: the role decides)."""
    return True if sensor_of(username) is not None or bridge_of(username) is not None else None


# Looked up here, not in the child: between fork and exec the child must not take the dynamic loader's locks.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGTERM it when the process that started it dies, even by
    SIGKILL, so that no Mosquitto outlives its launcher (holding its port and persistence file)."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _Spawner:
    """Starts children from one thread that lives as long as the process.

    Linux sends the parent-death signal when the *thread* that forked the child exits, not the process: a
    broker started from a short-lived thread (a timer, a test helper) would be killed the moment that thread
    returned. Forking from this thread ties the child to the process instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.Queue[Tuple[List[str], Dict[str, Any], Future]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def popen(self, args: List[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="broker-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._requests.put((args, kwargs, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            args, kwargs, done = self._requests.get()
            try:
                done.set_result(
                    subprocess.Popen(
                        args, preexec_fn=functools.partial(_die_with_parent, os.getpid()), **kwargs
                    )
                )
            except BaseException as exc:  # handed to the caller, whatever it is
                done.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(args: List[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(args, **kwargs)` of a child that gets SIGTERM when this process dies (HAProxy in
    front of the broker cells uses it too)."""
    return _SPAWNER.popen(args, **kwargs)


def terminate(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited within `timeout_s`; returns once it has."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BrokerProcess:
    """A Mosquitto child process with its own config, accounts, ACL and persistence directory.

    >>> with BrokerProcess() as broker:
    ...     creds = broker.credentials("cloud")

    `credentials(name)` creates the account on first use: `cloud`, `collector`, `cloud-<x>`, `collector-<x>`
    get that service's role; any other name must be a valid device id (protocol/ids.py) and becomes a device
    bound to client id = its name. Mosquitto gets SIGTERM when this process dies, however it dies.
    """

    def __init__(
        self,
        workdir: Optional[Path] = None,
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        tls_dir: Optional[Path] = None,
        tls_port: Optional[int] = None,
        plain_host: Optional[str] = None,
        extra_config: str = "",
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgecascade-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials_file = self.workdir / "credentials.json"
        self.dynsec_file = self.workdir / "dynamic-security.json"
        self.config_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        state = self._load_state()
        self.host = host
        # The plaintext listener: on `host` too unless told otherwise (TLS outside, plaintext on loopback).
        self.plain_host = plain_host or host
        # A restart on the same workdir keeps the ports its clients know, unless told otherwise.
        self.port = (
            port
            or (state.get("port") if state.get("host") == host else None)
            or find_free_port(self.plain_host)
        )
        self.tls_dir = Path(tls_dir) if tls_dir else None
        if self.tls_dir is not None and not (self.tls_dir / "server.crt").exists():
            make_test_certs(self.tls_dir)  # tests and bench: a fresh test CA unless one is given
        self.tls_port: Optional[int] = None
        if self.tls_dir is not None:
            previous = state.get("tls_port") if state.get("host") == host else None
            self.tls_port = tls_port or previous or find_free_port(host)
        self.extra_config = extra_config
        self._passwords: Dict[str, str] = dict(state.get("passwords", {}))
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        for user in (dynsec.ADMIN_USER, *SERVICE_USERS):
            self._passwords.setdefault(user, secrets.token_urlsafe(12))
        self._save_state()
        self._write_config()

    # -- credentials -------------------------------------------------------------------------------
    def _load_state(self) -> Dict[str, Any]:
        if not self.credentials_file.exists():
            return {}
        try:
            state = json.loads(self.credentials_file.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read {self.credentials_file}: {exc}") from None
        if not isinstance(state, dict) or not isinstance(state.get("passwords", {}), dict):
            raise RuntimeError(f"{self.credentials_file} is not a broker credentials file")
        return state

    def _save_state(self) -> None:
        state = {
            "host": self.host,
            "port": self.port,
            "tls_port": self.tls_port,
            "passwords": self._passwords,
        }
        dynsec.write_private(self.credentials_file, json.dumps(state, indent=2) + "\n")

    def _write_accounts(self) -> None:
        """The plugin's account file, from credentials.json (only while the broker is stopped: a running
        plugin owns the file and rewrites it on every change)."""
        users = sorted(self._passwords.items())
        entries = [dynsec.client_entry(u, pw, self._role(u), bound=_bound(u)) for u, pw in users]
        roles = [role for role in map(_sensor_role, self._passwords) if role is not None]
        document = dynsec.document(entries, extra_roles=roles)
        dynsec.write_private(self.dynsec_file, json.dumps(document, indent=2) + "\n")

    def write_accounts(self) -> None:
        """Write the plugin's account file now (not only at start), for a broker that someone else starts
        with plain `mosquitto -c <workdir>/mosquitto.conf` (the cells' generated config)."""
        if self.running:
            raise RuntimeError("the running broker's plugin owns its account file")
        with self._lock:
            self._write_accounts()

    @staticmethod
    def _role(username: str) -> str:
        return dynsec.ADMIN_USER if username == dynsec.ADMIN_USER else role_of(username)

    @property
    def users(self) -> List[str]:
        """Every account but the launcher's own admin."""
        return sorted(u for u in self._passwords if u != dynsec.ADMIN_USER)

    def add_users(self, usernames: Iterable[str]) -> None:
        """Create (or keep) accounts; on a running broker they exist when this returns.

        InvalidId (a ValueError) for a name that is neither a service account nor a valid device id."""
        with self._lock:
            new = [check_username(u) for u in dict.fromkeys(usernames) if u not in self._passwords]
            if not new:
                return
            passwords = {u: secrets.token_urlsafe(12) for u in new}
            if self.running:
                roles = [role for role in map(_sensor_role, new) if role is not None]
                self._control(
                    [dynsec.create_role_command(role) for role in roles]
                    + [
                        dynsec.create_client_command(u, pw, role_of(u), bound=_bound(u))
                        for u, pw in passwords.items()
                    ]
                )
            self._passwords.update(passwords)
            self._save_state()

    def _control(self, commands: List[Dict[str, Any]], timeout_s: float = 10.0) -> None:
        """Send dynamic-security commands as the admin account and wait for the plugin's answer."""
        admin = BrokerAddress(
            self.plain_host, self.port, dynsec.ADMIN_USER, self._passwords[dynsec.ADMIN_USER]
        )
        answered = threading.Event()
        subscribed = threading.Event()
        response: Dict[str, Any] = {}

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if not reason.is_failure:
                c.subscribe(dynsec.CONTROL_RESPONSE_TOPIC, qos=1)

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            response.update(json.loads(message.payload))
            answered.set()

        client = new_client(admin, f"{dynsec.ADMIN_USER}-{uuid.uuid4().hex[:8]}", on_connect=on_connect)
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = on_message
        client.connect(admin.host, admin.port)
        client.loop_start()
        try:
            if not subscribed.wait(timeout_s):
                raise RuntimeError(f"cannot log in to the broker on {admin.host}:{admin.port} as its admin")
            client.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
            if not answered.wait(timeout_s):
                raise RuntimeError("the broker's dynamic-security plugin did not answer")
        finally:
            client.disconnect()
            client.loop_stop()
        errors = dynsec.control_errors(response)
        if errors:
            raise RuntimeError(f"the broker refused account changes: {'; '.join(errors)}")

    def credentials(self, username: str, *, tls: bool = False) -> Credentials:
        if username not in self._passwords:
            self.add_users([username])
        if tls:
            if self.tls_port is None or self.tls_dir is None:
                raise ValueError("this broker was started without tls_dir")
            return Credentials(
                self.host, self.tls_port, username, self._passwords[username], str(self.tls_dir / "ca.crt")
            )
        return Credentials(self.plain_host, self.port, username, self._passwords[username])

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
            # Accounts, client-id binding and the roles (see dynsec.py), then the devices' %u patterns.
            f"plugin {dynsec.find_plugin()}",
            f"plugin_opt_config_file {self.dynsec_file}",
            f"acl_file {ACL_FILE}",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"listener {self.port} {self.plain_host}",
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

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout_s: float = 10.0) -> BrokerProcess:
        if self.running:
            return self
        with self._lock:
            self._write_accounts()
        self._proc = _SPAWNER.popen(
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
                with socket.create_connection((self.plain_host, self.port), timeout=0.2):
                    pass
                if self.tls_port is not None:
                    with socket.create_connection((self.host, self.tls_port), timeout=0.2):
                        pass
                logger.info(
                    "mosquitto listening on %s:%d (pid %d)", self.plain_host, self.port, self._proc.pid
                )
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"mosquitto did not accept connections on {self.plain_host}:{self.port} in {timeout_s}s"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop: SIGTERM lets mosquitto write its persistence file."""
        if self._proc is None:
            return
        terminate(self._proc, timeout_s)
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
