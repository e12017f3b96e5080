"""The units' sandbox does not break the services' libraries: run them under the same kernel rules.

`MemoryDenyWriteExecute=yes` and `SystemCallFilter=@system-service ~@privileged` are the two settings that
can break a Python service at run time (a library that JIT-compiles, an unusual system call). systemd is not
PID 1 here, so a child process applies the equivalent rules to itself:
- MDWE through prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (what systemd >= 255 uses; 252 uses a seccomp
  filter on mmap/mprotect with the same effect);
- the system call allow-list computed from systemd's own group tables (`systemd-analyze syscall-filter`),
  loaded through libseccomp, with clone3 answering ENOSYS as it does under RestrictNamespaces=;
then does what the services do: onnxruntime sessions for the edge cascade and the cloud model, an MQTT 5
connection and publish to the real broker, SQLite in WAL mode, SQLAlchemy over psycopg to PostgreSQL.
Controls inside the child prove the rules are in force (W+X mapping refused, chroot refused).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Set

import pytest

from broker.launcher import BrokerProcess

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
LIBSECCOMP = ctypes.util.find_library("seccomp")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)"
    ),
    pytest.mark.skipif(LIBSECCOMP is None, reason="libseccomp not installed (Debian package libseccomp2)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
]


def syscall_groups() -> Dict[str, Set[str]]:
    """systemd's own tables: group name -> system calls, nested groups expanded."""
    assert SYSTEMD_ANALYZE is not None
    text = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    raw: Dict[str, Set[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.strip()
            raw[current] = set()
        elif current and line.startswith("    ") and not line.strip().startswith("#"):
            raw[current].add(line.strip())

    def expand(group: str, seen: Set[str]) -> Set[str]:
        out: Set[str] = set()
        for item in raw[group]:
            if item.startswith("@"):
                if item not in seen:
                    out |= expand(item, seen | {item})
            else:
                out.add(item)
        return out

    return {group: expand(group, {group}) for group in raw}


def unit_allow_list() -> Set[str]:
    """What `SystemCallFilter=@system-service` then `SystemCallFilter=~@privileged` leave allowed."""
    text = (REPO / "deploy/edgecascade-agent@.service").read_text()
    assert "SystemCallFilter=@system-service\nSystemCallFilter=~@privileged\n" in text, (
        "unit changed: update me"
    )
    groups = syscall_groups()
    # systemd starts an allow-list with @default ("always permitted"), then applies the lines in order.
    return (groups["@default"] | groups["@system-service"]) - groups["@privileged"]


CHILD = r"""
import ctypes, errno, json, mmap, os, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print(json.dumps({"skip": "kernel without PR_SET_MDWE (Linux < 6.3)"})); sys.exit(0)

seccomp = ctypes.CDLL(cfg["libseccomp"], use_errno=True)
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, ERRNO = 0x7FFF0000, lambda e: 0x00050000 | e
ctx = seccomp.seccomp_init(ERRNO(errno.EPERM))   # SystemCallErrorNumber=EPERM
for name in cfg["allow"]:
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:  # names of other architectures resolve to nothing here
        assert seccomp.seccomp_rule_add(ctx, ALLOW, nr, 0) == 0, name
clone3 = seccomp.seccomp_syscall_resolve_name(b"clone3")
if clone3 >= 0:  # RestrictNamespaces= makes clone3 fail with ENOSYS; glibc falls back to clone
    assert seccomp.seccomp_rule_add(ctx, ERRNO(errno.ENOSYS), clone3, 0) == 0
assert seccomp.seccomp_load(ctx) == 0

# Controls: both rules are in force.
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W+X mapping was allowed: MDWE not in force")
except PermissionError:
    pass
try:
    os.chroot("/")
    raise SystemExit("chroot was allowed: the system call filter is not in force")
except PermissionError:
    pass

import numpy as np
from cloud_worker.model import CloudSession
from device_agent.cascade import EdgeCascade
models = cfg["models"]
cascade = EdgeCascade(models, providers=["CPUExecutionProvider"])
images = np.random.default_rng(0).integers(0, 256, (8, *cascade.input_shape), dtype=np.uint8)
decisions = cascade.decide(images)
probs = CloudSession(os.path.join(models, "cloud.onnx"), providers=["CPUExecutionProvider"]).logits(images)

import threading
import paho.mqtt.client as mqtt
from protocol.mqtt import BrokerAddress, new_client
address = BrokerAddress(**cfg["broker"])
connected = threading.Event()
client = new_client(address, address.username, on_connect=lambda *a: connected.set())  # bound client id
client.connect(address.host, address.port)
client.loop_start()
assert connected.wait(10), "no CONNACK"
client.publish(cfg["topic"], b"from the sandbox", qos=1).wait_for_publish(10)
client.disconnect(); client.loop_stop()

import sqlite3
db = sqlite3.connect(os.path.join(cfg["state_dir"], "outbox.db"))
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE t (x)"); db.execute("INSERT INTO t VALUES (1)"); db.commit(); db.close()

import sqlalchemy
engine = sqlalchemy.create_engine(cfg["pg"])
with engine.connect() as conn:
    pg = conn.execute(sqlalchemy.text("select 40 + 2")).scalar()
print(json.dumps({"decisions": len(decisions), "cloud_probs": list(probs.shape), "pg": pg}))
"""


def test_services_libraries_run_under_the_units_syscall_filter_and_mdwe(
    tiny_models: Path, broker: BrokerProcess, tmp_path: Path, pg_database: Any
) -> None:
    allow = unit_allow_list()
    assert "chroot" not in allow and "mmap" in allow  # the controls below rely on this
    broker.add_users(["sandbox-dev"])
    creds = broker.credentials("sandbox-dev")
    cfg = {
        "libseccomp": LIBSECCOMP,
        "allow": sorted(allow),
        "models": str(tiny_models),
        "broker": {
            "host": creds.host,
            "port": creds.port,
            "username": creds.username,
            "password": creds.password,
        },
        "topic": "edgecascade/v1/sandbox-dev/status",
        "state_dir": str(tmp_path),
        "pg": pg_database.render_as_string(hide_password=False),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result == {"decisions": 8, "cloud_probs": [8, 10], "pg": 42}
