"""Broker accounts in Mosquitto's dynamic-security plugin: who may log in, with which client id, what role.

Why the plugin and not only `password_file` + `acl_file`: Mosquitto 2.0's acl_file never checks a SUBSCRIBE
(`mosquitto_acl_check_default` returns success for every subscription and filters only on delivery), so any
device could join the cloud workers' shared group `$share/cloud/...` and be handed its round-robin share of
every device's offloads, which the read ACL then drops. A password file cannot bind a client id to an
account either, so any device could log in with another's client id and take its session over. The plugin
does both: a dynsec client may carry a client id it must connect with, and roles hold subscribe rules.

Who owns what:
- `edgecascade-roles.json` (beside this file): the roles and their topic rules: `cloud` (the only role that
  may subscribe `$share/cloud/...`, reads offloads, writes replies), `collector` (reads results and status,
  writes receipts), `device` (no shared subscriptions at all) and `edgecascade-admin` (`$CONTROL` only).
  A sensor account (`sensor-<device>`, `protocol.ids.sensor_account`) gets a role of its own (`sensor_role`):
  publish to that one device's `input` topic, everything else refused outright (never falling through).
  Rules no role matches fall through (default access "deny" = defer) to `edgecascade.acl`, whose `%u`
  patterns fence each device to its own topics: dynsec has no `%u`, so those stay in the acl_file.
- This module: the plugin's state document (accounts with PBKDF2-SHA512 password hashes, as Mosquitto 2.0
  stores them) and the `$CONTROL` commands that add an account to a running broker. A device's account is
  bound to client id = its username; services (`cloud`, `collector`, `cloud-*`, `collector-*`) are not, so
  several workers may share one account with distinct client ids (none of which a device can claim:
  protocol/ids.py reserves those names).

Standard library only: a broker host runs `python3 broker/dynsec.py init ...` (deploy/install.sh) without
the project's virtual environment.
"""

from __future__ import annotations

import argparse
import base64
import copy
import glob
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

ROLES_FILE = Path(__file__).resolve().with_name("edgecascade-roles.json")
ADMIN_USER = "edgecascade-admin"
DEVICE_ROLE = "device"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Mosquitto 2.0's dynsec: PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations (what `mosquitto_ctrl dynsec
# init` writes); the plugin refuses a salt of another length.
_SALT_BYTES = 12
_ITERATIONS = 101


def find_plugin() -> str:
    """Path of the dynamic-security plugin (Debian: /usr/lib/<triplet>/); RuntimeError if there is none."""
    patterns = [f"/usr/lib/*/{PLUGIN_NAME}", f"/usr/lib/{PLUGIN_NAME}", f"/usr/local/lib/{PLUGIN_NAME}"]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise RuntimeError(
        f"{PLUGIN_NAME} not found (looked in {', '.join(patterns)}): it ships with Debian's `mosquitto` "
        "package (2.0 or later)"
    )


def client_entry(username: str, password: str, role: str, *, bound: Optional[bool] = None) -> Dict[str, Any]:
    """One account as the plugin stores it. Devices (and, with `bound`, sensors) are bound to client id =
    username."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS, 64)
    entry: Dict[str, Any] = {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
        "roles": [{"rolename": role}],
    }
    if role == DEVICE_ROLE if bound is None else bound:
        entry["clientid"] = username
    return entry


def sensor_role(rolename: str, device_id: str) -> Dict[str, Any]:
    """The role of one device's sensor account: it may publish images to that device's `input` topic (also
    under a namespace, like every rule here) and nothing else. Explicit denials, so that nothing falls through
    to the acl_file's `%u` patterns (which would let it write `<root>/<its name>/results`)."""
    inputs = [f"edgecascade/v1/{device_id}/input", f"+/edgecascade/v1/{device_id}/input"]
    return {
        "rolename": rolename,
        "textdescription": f"Sensors and cameras of device {device_id}: publish to its input topic only",
        "acls": [
            *({"acltype": "publishClientSend", "topic": t, "priority": 1, "allow": True} for t in inputs),
            {"acltype": "publishClientSend", "topic": "#", "priority": 0, "allow": False},
            {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False},
            {"acltype": "subscribePattern", "topic": "#", "priority": 0, "allow": False},
        ],
    }


# What a site's bridge carries (cells/sites.py): device -> cloud and cloud -> device, for every device of the
# site; the topic kinds under <root>/<device>/ and the cloud-wide topics under <root>/ a device reads (the
# workers' load; model rollouts' manifests and chunks, which no test has sent across a bridge yet). No
# `gateway`: the fault sensors' windows stay on the site, whose gateway answers them (its own offloads to the
# cloud are a device's `offload`; tests/test_fault_sites.py checks that none reach the cell).
BRIDGE_UP = ("offload", "frames", "results", "status")
BRIDGE_DOWN = ("reply", "receipts")
BRIDGE_DOWN_SHARED = ("@cloud/+/load", "@models/+/manifest", "@model-files/#")


def bridge_role(rolename: str) -> Dict[str, Any]:
    """The role of a site broker's bridge account on its cell: publish what the site's devices send
    (offloads, frames, results, status, for any device: the site broker's own ACL fences each device), read
    and subscribe what the cloud sends them (replies, receipts, the workers' load, rollouts); nothing else,
    refused outright like a sensor's (never falling through to the acl_file's `%u` patterns), and no shared
    subscriptions."""
    roots = ("edgecascade/v1", "+/edgecascade/v1")
    up = [f"{r}/+/{kind}" for r in roots for kind in BRIDGE_UP]
    down = [f"{r}/+/{kind}" for r in roots for kind in BRIDGE_DOWN]
    down += [f"{r}/{topic}" for r in roots for topic in BRIDGE_DOWN_SHARED]
    return {
        "rolename": rolename,
        "textdescription": "A site broker's bridge: its devices' offloads, frames, results and status up, "
        "the cloud's replies, receipts and load down",
        "acls": [
            *({"acltype": "publishClientSend", "topic": t, "priority": 1, "allow": True} for t in up),
            *({"acltype": "publishClientReceive", "topic": t, "priority": 1, "allow": True} for t in down),
            *({"acltype": "subscribePattern", "topic": t, "priority": 1, "allow": True} for t in down),
            {"acltype": "subscribePattern", "topic": "$share/#", "priority": 2, "allow": False},
            {"acltype": "publishClientSend", "topic": "#", "priority": 0, "allow": False},
            {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False},
            {"acltype": "subscribePattern", "topic": "#", "priority": 0, "allow": False},
        ],
    }


def create_role_command(role: Dict[str, Any]) -> Dict[str, Any]:
    """The `$CONTROL` command that adds a role (e.g. `sensor_role`) to a running broker."""
    return {"command": "createRole", **role}


def load_roles(roles_file: Path = ROLES_FILE) -> Dict[str, Any]:
    """The roles and default access from edgecascade-roles.json (a copy: callers may add to it)."""
    data = json.loads(Path(roles_file).read_text())
    return {"roles": copy.deepcopy(data["roles"]), "defaultACLAccess": dict(data["defaultACLAccess"])}


def role_names(roles_file: Path = ROLES_FILE) -> List[str]:
    return [r["rolename"] for r in load_roles(roles_file)["roles"]]


def document(
    accounts: Iterable[Dict[str, Any]],
    roles_file: Path = ROLES_FILE,
    extra_roles: Iterable[Dict[str, Any]] = (),
) -> Dict[str, Any]:
    """The plugin's whole state file: `accounts` (from `client_entry`), the roles (the file's and
    `extra_roles`, e.g. sensors'), no groups."""
    doc = load_roles(roles_file)
    doc["roles"].extend(extra_roles)
    doc["clients"] = list(accounts)
    doc["groups"] = []
    return doc


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the start (no window in which others may read it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_client_command(
    username: str, password: str, role: str, *, bound: Optional[bool] = None
) -> Dict[str, Any]:
    """The `$CONTROL` command that adds one account to a running broker, with the same binding as above."""
    command: Dict[str, Any] = {
        "command": "createClient",
        "username": username,
        "password": password,
        "roles": [{"rolename": role}],
    }
    if role == DEVICE_ROLE if bound is None else bound:
        command["clientid"] = username
    return command


def control_errors(response: Dict[str, Any]) -> List[str]:
    """The errors in a `$CONTROL/dynamic-security/v1/response` message (empty: every command succeeded)."""
    return [f"{r.get('command', '?')}: {r['error']}" for r in response.get("responses", []) if r.get("error")]


def _init(args: argparse.Namespace) -> int:
    """`init`: a new state file holding only the admin account (install.sh on a broker host)."""
    out: Path = args.out
    if out.exists():
        print(
            f"dynsec init: {out} exists; accounts are managed with mosquitto_ctrl from now on",
            file=sys.stderr,
        )
        return 1
    pw_file: Path = args.admin_password_file
    if pw_file.exists():
        lines = pw_file.read_text().splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            print(f"dynsec init: {pw_file} is empty", file=sys.stderr)
            return 2
    else:
        password = secrets.token_urlsafe(18)
        write_private(pw_file, password + "\n")
    doc = document([client_entry(ADMIN_USER, password, ADMIN_USER)], args.roles)
    write_private(out, json.dumps(doc, indent=2) + "\n")
    print(f"dynsec init: wrote {out} (account {ADMIN_USER}, password in {pw_file})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broker/dynsec.py",
        description="Create the dynamic-security state file for an edgecascade broker host.",
        epilog="example:\n  python3 broker/dynsec.py init /var/lib/mosquitto/edgecascade-dynsec.json \\\n"
        "      --admin-password-file /etc/mosquitto/edgecascade-admin.pw",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="new state file with the admin account and the project's roles")
    init.add_argument("out", type=Path, help="the state file (plugin_opt_config_file); must not exist")
    init.add_argument(
        "--admin-password-file",
        type=Path,
        required=True,
        help="the admin's password (first line); generated and written (0600) when the file does not exist",
    )
    init.add_argument("--roles", type=Path, default=ROLES_FILE, help="roles file (default %(default)s)")
    init.set_defaults(func=_init)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
