"""CLI for `edgecascade models`: keygen, publish (with a canary group first), status, rollback, watch."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

HELP = "Roll model versions out to device groups over MQTT (signed, canary first, rollback)"
DESCRIPTION = (
    "Publish a model directory as a signed model version to a device group over the broker; agents that "
    "follow the group (`edgecascade agent --model-group G --trusted-key K.pub`) download it, check every "
    "file's sha256 and the ed25519 signature, and swap it in between two samples. A canary group can get it "
    "first: it is promoted to the fleet only if the canary devices' agreement with the cloud holds, and "
    "rolled back otherwise."
)
EPILOG = """examples:
  # once: the signing key pair (keep the .key off the devices and out of git; devices get the .pub)
  edgecascade models keygen --out ~/.config/edgecascade

  # version 2026-12-03a of models/fashion-mnist to the devices of group `fleet`
  edgecascade models publish models/fashion-mnist --version 2026-12-03a \\
      --key ~/.config/edgecascade/model-signing.key --group fleet \\
      --broker broker.lan:1883 --user operator --password-file operator.pw

  # to group `canary` first; to `fleet` once 200 offloads compared under it agree with the cloud at most
  # 5 points less often than under the version before; rolled back on the canary otherwise (exit 1)
  edgecascade models publish models/fashion-mnist --version 2026-12-03b --key ... --group fleet \\
      --canary canary --min-compared 200 --threshold 0.05 --canary-timeout 600 --broker ...

  # what each group serves, and every device's version, agreement with the cloud and refusals
  edgecascade models status --group canary --group fleet --broker ...

  # back to the version before the newest, by hand
  edgecascade models rollback --group fleet --broker ...

  # free the broker of the files of versions that fell out of every group's history (last 10 each)
  edgecascade models prune --group canary --group fleet --broker ...

  # watch a group and roll it back by itself whenever a new version's agreement falls (until SIGTERM)
  edgecascade models watch --group canary --threshold 0.05 --min-compared 200 --broker ...

Exit codes: 0 done; 1 the canary was rolled back, or nothing to roll back to; 2 bad arguments, keys, model
directory or broker; 3 the canary had not compared enough offloads by --canary-timeout (not promoted).
"""


# One example per action, in its own --help (`edgecascade models --help` has them all).
_EXAMPLES = {
    "keygen": "edgecascade models keygen --out ~/.config/edgecascade",
    "publish": "edgecascade models publish models/fashion-mnist --version 2026-12-03b \\\n"
    "    --key model-signing.key --group fleet --canary canary --broker broker.lan:1883 \\\n"
    "    --password-file operator.pw",
    "status": "edgecascade models status --group canary --group fleet --broker broker.lan:1883 "
    "--password-file operator.pw",
    "rollback": "edgecascade models rollback --group fleet --broker broker.lan:1883 "
    "--password-file operator.pw",
    "prune": "edgecascade models prune --group canary --group fleet --broker broker.lan:1883 "
    "--password-file operator.pw",
    "watch": "edgecascade models watch --group canary --threshold 0.05 --broker broker.lan:1883 "
    "--password-file operator.pw",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    raw_sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    class _Actions:  # each action's parser with its example as epilog
        @staticmethod
        def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
            return raw_sub.add_parser(
                name,
                epilog=f"example:\n  {_EXAMPLES[name]}",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                **kw,
            )

    sub = _Actions()
    keygen = sub.add_parser("keygen", help="a new ed25519 signing key pair (model-signing.key / .pub)")
    keygen.add_argument("--out", type=Path, required=True, help="directory for the two key files")
    publish = sub.add_parser("publish", help="publish a model directory as a signed version to a group")
    publish.add_argument("model_dir", type=Path, help="model directory (card.json and its ONNX blocks)")
    publish.add_argument("--version", required=True, help="version id (letters, digits, . _ -; <= 64)")
    publish.add_argument("--key", type=Path, required=True, help="the signing key (model-signing.key)")
    publish.add_argument("--group", required=True, help="the device group to serve it")
    publish.add_argument("--canary", metavar="GROUP", help="publish to this group first and watch it")
    publish.add_argument("--notes", default="", help="free text in the manifest (what changed)")
    publish.add_argument(
        "--include-cloud", action="store_true", help="ship the cloud block too (devices do not need it)"
    )
    status = sub.add_parser("status", help="what the groups serve and what each device reports")
    status.add_argument("--group", action="append", default=[], help="a device group (repeatable)")
    status.add_argument("--wait", type=float, default=2.0, help="seconds to collect statuses (default 2)")
    status.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    rollback = sub.add_parser("rollback", help="back to the version before the newest")
    rollback.add_argument("--group", required=True, help="the device group")
    prune = sub.add_parser(
        "prune", help="clear the broker's retained chunks of files no version in the groups' histories uses"
    )
    prune.add_argument(
        "--group",
        action="append",
        required=True,
        help="a device group (repeatable; name every group: a file only another group uses is cleared too)",
    )
    watch = sub.add_parser("watch", help="roll a group back by itself when a new version's agreement falls")
    watch.add_argument("--group", required=True, help="the device group")
    watch.add_argument(
        "--once", action="store_true", help="judge the group's current version once, then exit"
    )
    for command in (publish, watch):
        command.add_argument(
            "--threshold",
            type=float,
            default=0.05,
            help="largest allowed fall of the agreement with the cloud vs the previous version (default .05)",
        )
        command.add_argument(
            "--min-compared",
            type=int,
            default=200,
            help="offloads compared under the new version before a verdict (default 200)",
        )
        command.add_argument(
            "--canary-timeout", type=float, default=600.0, help="seconds to wait for a verdict (default 600)"
        )
    for command in (publish, status, rollback, prune, watch):
        command.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
        command.add_argument("--user", default="operator", help="MQTT account (default: operator)")
        command.add_argument("--password-file", type=Path, help="file whose first line is the password")
        command.add_argument("--tls-ca", help="CA certificate: connect over TLS")
        command.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests)")


def run(args: argparse.Namespace) -> int:
    from edgecascade.rollout.operator import RolloutError
    from protocol.mqtt import BrokerUnusable

    try:
        if args.models_command == "keygen":
            return _keygen(args)
        return int(_COMMANDS[args.models_command](args))
    except (ValueError, OSError, BrokerUnusable) as exc:
        print(f"edgecascade models: {exc}", file=sys.stderr)
        return 2
    except RolloutError as exc:
        print(f"edgecascade models: {exc}", file=sys.stderr)
        return 1


def _keygen(args: argparse.Namespace) -> int:
    from edgecascade.rollout.keys import keygen

    private, public = keygen(args.out)
    print(f"signing key {private} (0600: keep it here), public key {public} (for --trusted-key on devices)")
    return 0


def _operator(args: argparse.Namespace) -> Any:
    from edgecascade.rollout.operator import Operator
    from protocol.mqtt import BrokerAddress, read_secret
    from protocol.topics import Topics

    password = read_secret(args.password_file) if args.password_file else ""
    address = BrokerAddress.parse(args.broker, args.user, password, args.tls_ca)
    topics = Topics.namespaced(args.namespace) if args.namespace else Topics()
    return Operator(address, topics)


def _publish(args: argparse.Namespace) -> int:
    from edgecascade.rollout.bundles import build_bundle
    from edgecascade.rollout.keys import load_private_key

    _check_watch_args(args)
    bundle = build_bundle(
        args.model_dir,
        args.version,
        load_private_key(args.key),
        include_cloud=args.include_cloud,
        notes=args.notes,
    )
    with _operator(args) as op:
        sent = op.publish_files(bundle)
        _say(f"published the files of {bundle.version}: {sent} bytes in {len(bundle.data)} files")
        if args.canary:
            op.watch_status()
            op.publish(bundle.signed, args.canary)
            _say(f"{bundle.version} -> canary group {args.canary}; watching its agreement with the cloud")
            verdict = _judge(op, args, args.canary, bundle.version)
            if verdict.decision == "rollback":
                was, now = op.rollback(args.canary)
                _say(f"canary {args.canary} rolled back from {was} to {now}: {verdict.reason}")
                return 1
            if verdict.decision == "wait":
                _say(f"not promoted to {args.group}: {verdict.reason} by --canary-timeout")
                return 3
            _say(f"canary passed: {verdict.reason}")
        op.publish(bundle.signed, args.group)
        _say(f"{bundle.version} -> group {args.group}")
    return 0


def _judge(op: Any, args: argparse.Namespace, group: str, version: str) -> Any:
    from edgecascade.rollout.canary import watch

    last: List[str] = []

    def show(verdict: Any) -> None:
        if not last or last[-1] != verdict.reason:
            last.append(verdict.reason)
            _say(f"{group} {verdict.decision}: {verdict.devices} devices on {version}; {verdict.reason}")

    return watch(
        op,
        group,
        version,
        threshold=args.threshold,
        min_compared=args.min_compared,
        timeout_s=args.canary_timeout,
        on_verdict=show,
    )


def _check_watch_args(args: argparse.Namespace) -> None:
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold is a fall in agreement between 0 and 1, got {args.threshold}")
    if args.min_compared < 1:
        raise ValueError(f"--min-compared must be at least 1, got {args.min_compared}")
    if not args.canary_timeout > 0:
        raise ValueError(f"--canary-timeout must be positive, got {args.canary_timeout}")


def _status(args: argparse.Namespace) -> int:
    from protocol.bundle import parse_unverified

    if not args.wait >= 0:
        raise ValueError(f"--wait must be >= 0, got {args.wait}")
    with _operator(args) as op:
        op.watch_status()
        groups: Dict[str, Any] = {}
        for group in args.group:
            history = [parse_unverified(h).version for h in op.history(group)]
            groups[group] = {"serving": history[-1] if history else None, "history": history}
        threading.Event().wait(args.wait)  # statuses arrive as the broker hands out the retained ones
        with op.lock:
            statuses = dict(op.statuses)
    devices = []
    for device, status in sorted(statuses.items()):
        model = status.model
        if args.group and (model is None or model.group not in args.group):
            continue
        devices.append(
            {
                "device": device,
                "state": status.state,
                "group": model.group if model else None,
                "version": model.current.version if model else None,
                "agreement": model.current.agreement if model else None,
                "compared": model.current.compared if model else None,
                "previous": dict(vars(model.previous)) if model and model.previous else None,
                "refused": model.refused if model else None,
            }
        )
    if args.json:
        print(json.dumps({"groups": groups, "devices": devices}))
        return 0
    for group, info in groups.items():
        print(f"group {group}: serving {info['serving']} (history: {', '.join(info['history']) or 'none'})")
    for d in devices:
        agreement = "-" if d["agreement"] is None else f"{d['agreement']:.1%}"
        print(
            f"{d['device']:<24} {d['state']:<7} {d['group'] or '-':<12} {d['version'] or '-':<24} "
            f"agreement {agreement} of {d['compared'] or 0}, refused {d['refused'] or 0}"
        )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        was, now = op.rollback(args.group)
    _say(f"group {args.group} rolled back from {was} to {now}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        cleared = op.prune(args.group)
    _say(f"cleared the chunks of {cleared} files no version of {', '.join(args.group)} uses any more")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from edgecascade.rollout.canary import ROLLBACK, WAIT
    from protocol.bundle import parse_unverified

    _check_watch_args(args)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    judged: Optional[str] = None
    with _operator(args) as op:
        op.watch_status()
        while not stop.is_set():
            history = op.history(args.group)
            version = parse_unverified(history[-1]).version if history else None
            if version is None or version == judged:
                if args.once:
                    return 0
                stop.wait(5.0)  # a new version shows in the history; polled, it is not retained news
                continue
            verdict = _judge(op, args, args.group, version)
            if verdict.decision == ROLLBACK:
                was, now = op.rollback(args.group)
                _say(f"group {args.group} rolled back from {was} to {now}: {verdict.reason}")
                judged = now
            elif verdict.decision != WAIT:
                judged = version
            if args.once:
                return 1 if verdict.decision == ROLLBACK else 0
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_COMMANDS = {"publish": _publish, "status": _status, "rollback": _rollback, "prune": _prune, "watch": _watch}
