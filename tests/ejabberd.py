"""A private ejabberd 23.01 (Debian's package) with only its MQTT 5 listener: a real broker that says in its
CONNACK that it has no shared subscriptions (SharedSubscriptionAvailable=0) and closes the connection of
a client that subscribes `$share/...` anyway. `make setup` installs it; the Debian package's own service is
never used: each test session gets its own node, config, spool and port under a temporary directory."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import List

from broker.launcher import find_free_port
from protocol.mqtt import BrokerAddress

EJABBERDCTL = "/usr/sbin/ejabberdctl"
PASSWORD = "ejabberd-test-password"
_CONFIG = """hosts: [localhost]
loglevel: warning
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
auth_method: [internal]
modules:
  mod_mqtt: {{}}
"""


class EjabberdUnavailable(RuntimeError):
    """ejabberd could not be started here: the message says why."""


class EjabberdProcess:
    """`start()`, `account(name)` (a BrokerAddress of a registered user), `stop()`."""

    def __init__(self) -> None:
        if not os.path.exists(EJABBERDCTL):
            raise EjabberdUnavailable(f"{EJABBERDCTL} missing: `make setup` installs the ejabberd package")
        if os.geteuid() != 0:  # Debian's ejabberdctl runs only as root or as the `ejabberd` account
            raise EjabberdUnavailable("ejabberdctl must run as root (it switches to the ejabberd account)")
        self.port = find_free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgecascade-ejabberd-"))
        self.node = f"ectest{uuid.uuid4().hex[:8]}@localhost"
        (self.root / "ejabberd.yml").write_text(_CONFIG.format(port=self.port))
        (self.root / "ejabberdctl.cfg").write_text('ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        (self.root / "inetrc").write_text('{file, hosts, "/etc/hosts"}.\n')
        for sub in ("db", "log"):
            (self.root / sub).mkdir()
        user = pwd.getpwnam("ejabberd")
        for path in [self.root, *self.root.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        command: List[str] = [
            EJABBERDCTL, "--config-dir", str(self.root), "--config", str(self.root / "ejabberd.yml"),
            "--ctl-config", str(self.root / "ejabberdctl.cfg"), "--spool", str(self.root / "db"),
            "--logs", str(self.root / "log"), "--node", self.node, *args,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        if result.returncode != 0:
            raise EjabberdUnavailable(
                f"ejabberdctl {args[0]} failed: {(result.stderr or result.stdout)[-800:]}"
            )
        return result.stdout

    def start(self) -> EjabberdProcess:
        self._ctl("start")
        self._ctl("started")  # blocks until the node has started (or fails)
        return self

    def account(self, username: str) -> BrokerAddress:
        self._ctl("register", username, "localhost", PASSWORD)
        return BrokerAddress("127.0.0.1", self.port, username, PASSWORD)

    def stop(self) -> None:
        try:
            self._ctl("stop", timeout_s=30)
            self._ctl("stopped", timeout_s=30)
        except (EjabberdUnavailable, subprocess.TimeoutExpired):
            pass  # already down; the directory goes anyway
        shutil.rmtree(self.root, ignore_errors=True)
