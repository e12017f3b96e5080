"""Identifiers: one rule for device ids, run ids and the other names that reach topics, files and SQL.

A device id is an MQTT username, client id and topic level, part of the outbox's file name and a key column
in SQL; a run id is a key column and part of outbox keys. Every place that takes one checks it here, once, at
the edge (CLI, config, broker users, decoded records), so that an id which one of those places would refuse
(PostgreSQL's 128-character column, a 255-byte file name, '+', '#' or '/' in a topic) never gets in.

The rule: ASCII letters, digits, '.', '_' and '-', starting with a letter or a digit; at most 64 characters
for a device id (a generated run id adds 23 to it), 128 for a run id. The service accounts (`cloud`,
`collector`, `operator`, `gateway` and their `cloud-*` / ... / `gateway-*` instances) are not device ids,
and neither is anything starting with `edgecascade` (the broker's admin account, the collector's client id
`edgecascade-collector`):
the broker binds a device's client id to its username, so a device named like a service's client id could
otherwise take that session over. A sensor account (`sensor-<device id>`: a camera or sensor that publishes
images to one device's `input` topic) is not a device id either.
"""

from __future__ import annotations

import re
from typing import Optional

DEVICE_ID_MAX = 64
RUN_ID_MAX = 128
NAME_MAX = 64  # namespaces, worker ids, group names
# operator: publishes model rollouts; gateway: a site's gateway workers (the fault hierarchy)
SERVICE_ROLES = ("cloud", "collector", "operator", "gateway")
RESERVED_PREFIX = "edgecascade"  # infrastructure names: the broker admin, service client ids
SENSOR_PREFIX = "sensor-"  # + a device id: the account that may publish to that device's input topic

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


class InvalidId(ValueError):
    """An identifier that breaks the rule above; the message says which part."""


def check_name(value: object, what: str, max_len: int = NAME_MAX) -> str:
    """`value` if it follows the identifier rule within `max_len` characters, else InvalidId."""
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidId(f"{what} must not be empty")
    if len(value) > max_len:
        raise InvalidId(f"{what} {value[:24]!r}... is {len(value)} characters long, at most {max_len}")
    if not _ID.match(value):
        raise InvalidId(
            f"{what} {value!r} may hold only ASCII letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value


def service_role(username: str) -> Optional[str]:
    """The role of a service account (`cloud`, `cloud-2`, `gateway-site1`, ...), else None."""
    for role in SERVICE_ROLES:
        if username == role or username.startswith(role + "-"):
            return role
    return None


def check_device_id(value: object) -> str:
    device_id = check_name(value, "device id", DEVICE_ID_MAX)
    if service_role(device_id) is not None:
        raise InvalidId(f"device id {device_id!r} is reserved for the {service_role(device_id)} service")
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise InvalidId(f"device id {device_id!r}: names starting with {RESERVED_PREFIX!r} are reserved")
    if device_id.startswith(SENSOR_PREFIX):
        raise InvalidId(f"device id {device_id!r}: {SENSOR_PREFIX}<device> names a device's sensor account")
    if device_id.startswith(BRIDGE_PREFIX):
        raise InvalidId(
            f"device id {device_id!r}: {BRIDGE_PREFIX}<site> names a site broker's bridge account"
        )
    return device_id


def sensor_account(device_id: str) -> str:
    """The broker account of `device_id`'s sensors: it may publish to the device's input topic only."""
    return SENSOR_PREFIX + check_device_id(device_id)


def sensor_of(username: str) -> Optional[str]:
    """The device a sensor account (`sensor-<device id>`) feeds, else None."""
    if isinstance(username, str) and username.startswith(SENSOR_PREFIX):
        return check_device_id(username[len(SENSOR_PREFIX) :])
    return None


# + a site name: the account a site broker's bridge logs in to its cloud cell with (cells/sites.py)
BRIDGE_PREFIX = "bridge-"


def bridge_account(site: str) -> str:
    """The broker account (and client id) of site `site`'s bridge to its cell."""
    return BRIDGE_PREFIX + check_name(site, "site name", DEVICE_ID_MAX - len(BRIDGE_PREFIX))


def bridge_of(username: str) -> Optional[str]:
    """The site a bridge account (`bridge-<site>`) belongs to, else None."""
    if isinstance(username, str) and username.startswith(BRIDGE_PREFIX):
        return check_name(username[len(BRIDGE_PREFIX) :], "site name")
    return None


def check_username(value: object) -> str:
    """A broker account name: a service account (`cloud`, `collector-2`, ...), a sensor account
    (`sensor-<device id>`), a site's bridge account (`bridge-<site>`) or a device id."""
    if isinstance(value, str) and service_role(value) is not None:
        return check_name(value, "service account", DEVICE_ID_MAX)
    if isinstance(value, str) and sensor_of(value) is not None:
        return value
    if isinstance(value, str) and bridge_of(value) is not None:
        return check_name(value, "bridge account", DEVICE_ID_MAX)
    return check_device_id(value)


def check_run_id(value: object) -> str:
    return check_name(value, "run id", RUN_ID_MAX)
