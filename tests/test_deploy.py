"""deploy/: install.sh into a temporary root, `systemd-analyze verify` and `security` on the units, the
Mosquitto drop-in on a real Mosquitto, the RAPL tmpfiles rule on a fake sysfs.

What `systemd-analyze verify` (systemd 252) needs in a container without systemd as PID 1, found here:
- no running manager: verify loads the units in a test manager of its own;
- every ExecStart=/ExecStartPre= binary must exist and be executable (else exit 1, "Command ... is not
  executable"); with --root=DIR it is looked up under DIR, so the tests put stubs where the venv would be;
- the units the default dependencies name (sysinit.target, basic.target, shutdown.target) and Wants= targets
  must load from the unit path, under --root too (exit 1, "Unit sysinit.target not found"): the tests copy the
  host's /usr/lib/systemd/system into the root (symlinks kept: they resolve inside the root);
- an unknown key or a bad value is only a warning ("..., ignoring") with exit status 0, so a clean verify
  means exit 0 AND nothing on stderr; a test below shows such a warning is caught.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from broker.launcher import find_free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)"
)
# template (as shipped) -> the instance name the tests check it under
INSTANCES = {
    "edgecascade-agent@.service": "edgecascade-agent@cam01.service",
    "edgecascade-cloud@.service": "edgecascade-cloud@gpu0.service",
    "edgecascade-collect.service": "edgecascade-collect.service",
}
MAX_EXPOSURE = 5.0


def run_install(*args: str, env: Optional[Dict[str, str]] = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["bash", str(INSTALL), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- install.sh --------------------------------------------------------------------------------------------
EXPECTED_TREE = sorted(
    [
        "etc/systemd/system/edgecascade-agent@.service",
        "etc/systemd/system/edgecascade-agent@.service.d/jetson.conf",
        "etc/systemd/system/edgecascade-agent@.service.d/rapl.conf",
        "etc/systemd/system/edgecascade-cloud@.service",
        "etc/systemd/system/edgecascade-cloud@.service.d/gpu.conf",
        "etc/systemd/system/edgecascade-collect.service",
        "etc/tmpfiles.d/edgecascade-rapl.conf",
        "etc/sysusers.d/edgecascade.conf",
        "etc/edgecascade/agent.toml",
        "etc/edgecascade/agent.toml.example",
        "etc/edgecascade/cloud.toml",
        "etc/edgecascade/cloud.toml.example",
        "etc/edgecascade/collect.toml",
        "etc/edgecascade/collect.toml.example",
        "etc/mosquitto/conf.d/edgecascade.conf",
        "etc/mosquitto/conf.d/edgecascade-listener.conf",
        "etc/mosquitto/edgecascade.acl",
        "etc/mosquitto/edgecascade-admin.pw",
        "var/lib/mosquitto/edgecascade-dynsec.json",
    ]
)


def test_install_into_a_temporary_root_then_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = run_install(
        "--role",
        "all",
        "--jetson",
        "--gpu",
        "--rapl",
        "--no-venv",
        env={"DESTDIR": str(root), "PREFIX": "/srv/ec"},
    )
    tree = [f for f in files_under(root) if not f.startswith("srv/ec/models/")]
    assert tree == EXPECTED_TREE

    units = root / "etc/systemd/system"
    agent = (units / "edgecascade-agent@.service").read_text()
    # PREFIX is substituted into the units and configs; DESTDIR never is.
    assert (
        "ExecStart=/srv/ec/venv/bin/edgecascade agent --config /etc/edgecascade/agent.toml --device-id %i"
        in agent
    )
    assert "/opt/edgecascade" not in agent and str(root) not in agent
    assert 'models = "/srv/ec/models/fashion-mnist"' in (root / "etc/edgecascade/agent.toml").read_text()
    # Project broker settings verbatim; the ACL is the project's.
    assert (root / "etc/mosquitto/conf.d/edgecascade.conf").read_text() == (
        REPO / "broker/edgecascade.conf"
    ).read_text()
    assert (root / "etc/mosquitto/edgecascade.acl").read_bytes() == (
        REPO / "broker/edgecascade.acl"
    ).read_bytes()

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).stat().st_mode)

    assert mode("etc/edgecascade/credentials") == 0o700  # secrets: root only
    assert mode("etc/mosquitto/edgecascade-admin.pw") == 0o600
    assert mode("var/lib/mosquitto/edgecascade-dynsec.json") == 0o600
    assert mode("etc/systemd/system/edgecascade-agent@.service") == 0o644
    assert mode("etc/edgecascade/agent.toml") == 0o644

    # The venv step, skipped, still says exactly what it would run.
    venv = root / "srv/ec/venv"
    assert f"skipped (--no-venv): python3 -m venv {venv}\n" in out
    assert (
        f"skipped (--no-venv): {venv}/bin/python -m pip install --upgrade {REPO}[cloud,db,device,jetson]\n"
        in out
    )

    out = run_install("--uninstall", env={"DESTDIR": str(root), "PREFIX": "/srv/ec"})
    assert "kept" not in out
    assert list(root.rglob("*")) == []  # not even an empty directory is left


def _stub_python(tmp_path: Path) -> Path:
    """A `python` that records its arguments and, for `-m venv DIR`, makes DIR/bin/python (itself)."""
    log = tmp_path / "python-calls.log"
    stub = tmp_path / "stub-python"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$0 $*" >> {log}\n'
        'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n'
    )
    stub.chmod(0o755)
    return stub


def test_venv_step_creates_the_venv_and_installs_the_role_extras(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stub = _stub_python(tmp_path)
    run_install(
        "--role",
        "agent",
        "--no-rapl",
        env={"DESTDIR": str(root), "PYTHON": str(stub), "PIP_INSTALL_ARGS": "--find-links /srv/wheels"},
    )
    venv = root / "opt/edgecascade/venv"
    calls = (tmp_path / "python-calls.log").read_text().splitlines()
    assert calls == [
        f"{stub} -m venv {venv}",
        f"{venv}/bin/python -m pip install --upgrade --find-links /srv/wheels {REPO}[device]",
    ]
    # An agent host gets the agent's unit and config only.
    assert not (root / "etc/systemd/system/edgecascade-cloud@.service").exists()
    assert not (root / "etc/mosquitto").exists()


def test_make_install_honours_destdir_and_prefix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stub = _stub_python(tmp_path)
    proc = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={root}", "PREFIX=/srv/ec"],
        cwd=REPO,
        env={**os.environ, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "srv/ec/venv/bin/python").exists()
    assert (
        "/srv/ec/venv/bin/edgecascade collect"
        in (root / "etc/systemd/system/edgecascade-collect.service").read_text()
    )
    calls = (tmp_path / "python-calls.log").read_text()
    assert f"pip install --upgrade {REPO}[cloud,db,device]" in calls


def test_existing_configs_are_never_overwritten_and_edits_survive_uninstall(tmp_path: Path) -> None:
    env = {"DESTDIR": str(tmp_path / "root")}
    conf = tmp_path / "root/etc/edgecascade"
    run_install("--role", "cloud,collect", "--no-venv", env=env)
    edited = conf / "cloud.toml"
    edited.write_text(edited.read_text().replace("mqtt.example.net", "broker.lan"))
    (conf / "credentials/cloud.mqtt-password").write_text("s3cret\n")

    out = run_install("--role", "cloud,collect", "--no-venv", env=env)
    assert f"kept {edited}" in out
    assert "broker.lan" in edited.read_text()

    out = run_install("--uninstall", "--role", "cloud,collect", env=env)
    assert edited.exists() and (conf / "credentials/cloud.mqtt-password").exists()
    assert not (conf / "collect.toml").exists()  # unedited: removed
    assert f"{edited} (edited)" in out
    run_install("--uninstall", "--purge", "--role", "cloud,collect", env=env)
    assert not conf.exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    env = {"DESTDIR": str(tmp_path)}
    out = run_install("--role", "fridge", env=env, check=False)
    assert "unknown role 'fridge'" in out
    out = run_install("--prefix", "relative/dir", env=env, check=False)
    assert "PREFIX must be an absolute plain path" in out
    assert files_under(tmp_path) == []


# -- systemd-analyze ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installed root (every drop-in) that `systemd-analyze --root` can load the instances from."""
    root = tmp_path_factory.mktemp("verify") / "root"
    run_install("--role", "all", "--jetson", "--gpu", "--rapl", "--no-venv", env={"DESTDIR": str(root)})
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    # Stand-ins for what the venv and the host provide: verify only checks they are executables.
    for exe in ("opt/edgecascade/venv/bin/edgecascade", "usr/bin/systemd-tmpfiles"):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\nexit 0\n")
        (root / exe).chmod(0o755)
    units = root / "etc/systemd/system"
    for template, instance in INSTANCES.items():
        if template != instance:  # an instance file: %i is expanded, so errors a bare template hides show
            shutil.copy(units / template, units / instance)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60)


@needs_systemd
def test_units_verify_clean_on_instance_names(verify_root: Path) -> None:
    proc = analyze("verify", "--man=no", f"--root={verify_root}", *INSTANCES.values())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # warnings ("..., ignoring") exit 0 too


@needs_systemd
def test_verify_catches_what_a_broken_unit_would_hide(verify_root: Path, tmp_path: Path) -> None:
    """The control for the test above: a typo and a bad value only warn; a missing binary fails."""
    units = verify_root / "etc/systemd/system"
    broken = units / "edgecascade-broken@x.service"
    text = (DEPLOY / "edgecascade-agent@.service").read_text()
    broken.write_text(text.replace("Restart=on-failure", "Restart=sometimes\nProtectSytem=strict"))
    try:
        proc = analyze("verify", "--man=no", f"--root={verify_root}", broken.name)
        assert proc.returncode == 0
        assert "Failed to parse service restart specifier" in proc.stderr
        assert "Unknown key 'ProtectSytem'" in proc.stderr
        broken.write_text(text.replace("/opt/edgecascade/venv", "/opt/missing/venv"))
        proc = analyze("verify", "--man=no", f"--root={verify_root}", broken.name)
        assert proc.returncode != 0 and "is not executable" in proc.stderr
    finally:
        broken.unlink()


def exposure(unit_path: Path) -> float:
    proc = analyze("security", "--offline=yes", str(unit_path))
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout
    return float(match.group(1))


@needs_systemd
def test_security_exposure_of_each_unit(verify_root: Path, tmp_path: Path) -> None:
    found = {}
    for template, instance in INSTANCES.items():
        bare = tmp_path / instance  # the unit as shipped, without hardware drop-ins
        shutil.copy(DEPLOY / template, bare)
        found[instance] = exposure(bare)
        # as installed with every drop-in (Jetson devices, RAPL, GPU): drop-ins are read from the unit's dir
        found[instance + " +drop-ins"] = exposure(verify_root / "etc/systemd/system" / instance)
    print("systemd-analyze security --offline=yes:", found)
    assert all(level <= MAX_EXPOSURE for level in found.values()), found


# -- Mosquitto drop-in -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_mosquitto_drop_in_loads_from_a_stock_main_config(tmp_path: Path) -> None:
    """Stock mosquitto.conf + `include_dir conf.d` with our two files: starts, wants passwords, has the ACL
    and the roles; accounts made the way the drop-in's header says (mosquitto_ctrl as edgecascade-admin).

    Only the absolute /etc/mosquitto and /var/lib/mosquitto paths and the port are rewritten to point into
    the temporary root.
    """
    from protocol.mqtt import BrokerAddress, new_client

    root = tmp_path / "root"
    run_install("--role", "broker", env={"DESTDIR": str(root)})
    mosq = root / "etc/mosquitto"
    port = find_free_port()
    listener = mosq / "conf.d/edgecascade-listener.conf"
    text = listener.read_text().replace("/etc/mosquitto/", f"{mosq}/")
    text = text.replace("/var/lib/mosquitto/", f"{root}/var/lib/mosquitto/")
    # Loopback by default: the only active listener line is the plaintext one on 127.0.0.1.
    assert re.findall(r"(?m)^listener .*$", text) == ["listener 1883 127.0.0.1"]
    listener.write_text(re.sub(r"(?m)^listener 1883 127.0.0.1$", f"listener {port} 127.0.0.1", text))
    (tmp_path / "persist").mkdir()
    main = tmp_path / "mosquitto.conf"
    main.write_text(
        # Debian's stock file, with its paths moved into tmp_path (and `user`: we are not user mosquitto)
        f"pid_file {tmp_path}/mosquitto.pid\npersistence true\npersistence_location {tmp_path}/persist/\n"
        f"log_dest file {tmp_path}/mosquitto.log\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
        f"include_dir {mosq}/conf.d\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(main)], stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.05)
        admin_pw = (mosq / "edgecascade-admin.pw").read_text().strip()

        def ctl(*args: str) -> None:
            base = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(port), "-u", "edgecascade-admin"]
            done = subprocess.run([*base, "-P", admin_pw, "dynsec", *args], capture_output=True, text=True)
            assert done.returncode == 0 and "rror" not in done.stdout + done.stderr, done.stdout + done.stderr

        for user, extra, role in (("cloud", [], "cloud"), ("cam01", ["-c", "cam01"], "device")):
            ctl("createClient", user, *extra, "-p", f"pw-{user}")
            ctl("addClientRole", user, role)
        ctl("createClient", "cam02", "-c", "cam02", "-p", "pw-cam02")
        ctl("addClientRole", "cam02", "device")

        def connect(user: Optional[str], client_id: Optional[str] = None) -> tuple:
            done = threading.Event()
            result: dict = {}

            def on_connect(c, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
                result["reason"] = reason
                done.set()

            address = BrokerAddress("127.0.0.1", port, user or "", f"pw-{user}" if user else "")
            client = new_client(address, client_id or f"{user}", on_connect=on_connect)
            if user is None:
                client.username_pw_set(None)
            client.connect("127.0.0.1", port)
            client.loop_start()
            clients.append(client)
            assert done.wait(5), "no CONNACK"
            return client, result["reason"]

        def subscribe(client: object, topic: str) -> list:
            granted: list = []
            subscribed = threading.Event()
            client.on_subscribe = lambda c, u, mid, reasons, p: (granted.extend(reasons), subscribed.set())  # type: ignore[attr-defined]
            client.subscribe(topic, qos=1)  # type: ignore[attr-defined]
            assert subscribed.wait(5)
            return granted

        _, anonymous = connect(None)
        assert anonymous.is_failure  # allow_anonymous false came from broker/edgecascade.conf
        cloud, reason = connect("cloud", "cloud-w1")
        assert not reason.is_failure
        got: list = []
        cloud.on_message = lambda c, u, m: got.append(m.topic)
        assert not subscribe(cloud, "$share/cloud/edgecascade/v1/+/offload")[0].is_failure
        cam, reason = connect("cam01")
        assert not reason.is_failure
        # The device role: no place in the workers' shared subscription (the roles file is in force) ...
        assert subscribe(cam, "$share/cloud/edgecascade/v1/+/offload")[0].is_failure
        # ... and the client-id binding: another device cannot log in as cam01's session.
        assert connect("cam02", "cam01")[1].is_failure and cam.is_connected()
        cam.publish("edgecascade/v1/cam01/offload", b"own", qos=1).wait_for_publish(5)
        cam.publish("edgecascade/v1/cam02/offload", b"forged", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a forged message, if the ACL let it through, would arrive right behind
        assert got == ["edgecascade/v1/cam01/offload"]  # the ACL file is in force
    finally:
        for client in clients:
            client.loop_stop()
        proc.terminate()
        proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
    log = (tmp_path / "mosquitto.log").read_text()
    assert f"Opening ipv4 listen socket on port {port}" in log
    assert "Error" not in log and "Duplicate" not in log, log


# -- RAPL tmpfiles rule ------------------------------------------------------------------------------------
@needs_systemd
def test_rapl_tmpfiles_rule_hands_energy_counters_to_the_group(tmp_path: Path) -> None:
    """The rule the RAPL drop-in re-applies before each start, on a fake sysfs in the real layout."""
    root = tmp_path / "root"
    run_install("--role", "agent", "--rapl", "--no-venv", env={"DESTDIR": str(root)})
    (root / "etc/group").write_text("edgecascade-power:x:977:\n")  # what systemd-sysusers would add
    zones = root / "sys/devices/virtual/powercap/intel-rapl"
    counters = []
    for zone in ("intel-rapl:0", "intel-rapl:0/intel-rapl:0:0"):
        (zones / zone).mkdir(parents=True)
        counter = zones / zone / "energy_uj"
        counter.write_text("123456\n")
        counter.chmod(0o400)  # as the kernel has it since 5.10
        counters.append(counter)
        link = root / "sys/class/powercap" / Path(zone).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(zones / zone, link.parent))
    tmpfiles = shutil.which("systemd-tmpfiles")
    assert tmpfiles is not None
    proc = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", "edgecascade-rapl.conf"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for counter in counters:
        st = counter.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o440, 977)
