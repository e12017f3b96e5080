#!/usr/bin/env bash
# Smoke test of the units under a real systemd, on a host (or VM) where systemd is not PID 1 or must not be
# touched: boots this host's own tree in systemd-nspawn on an overlay whose writes go to a tmpfs, with only
# the edgecascade units enabled, a private Mosquitto on the host and tiny models. Checks, with the units
# exactly as install.sh writes them (DynamicUser, LoadCredential, seccomp, MDWE ...):
#   the agent runs a dataset through the cascade and exits 0; the cloud worker answers its offloads;
#   the collector stores every record in SQLite (the SetCredential= default); both report READY=1 and
#   ping the watchdog; a frozen worker is killed by the watchdog and restarted.
# Needs root, overlayfs, systemd-container (apt-get install systemd-container), mosquitto, network for pip
# (the venv is built by install.sh for real). About 2-3 minutes. KEEP=1 keeps $WORK for a look afterwards.
# SOURCE=head (default) installs the last commit (git archive HEAD), SOURCE=tree the working tree as it is.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/srv/edgecascade-smoke}
SAMPLES=${SAMPLES:-300}
# The venv's interpreter must live outside /home and /root: ProtectHome=yes hides them from the services.
PYTHON=${PYTHON:-/usr/bin/python3}
ROOT="$WORK/root"
VENV="$ROOT/opt/edgecascade/venv"
MNT=/run/edgecascade-smoke
NSPAWN_PID="" BROKER_PID="" LEADER=""

die() {
  echo "smoke: FAIL: $*" >&2
  if [ -n "$LEADER" ]; then
    nsenter -t "$LEADER" -a systemctl --no-pager list-units --all 'edgecascade*' >&2
    nsenter -t "$LEADER" -a journalctl --no-pager -o short-monotonic -n 60 -u 'edgecascade*' | cut -c1-300 >&2
  fi
  exit 1
}
say() { echo "smoke: $*"; }
[ "$(id -u)" = 0 ] || die "run as root"
command -v systemd-nspawn >/dev/null || die "needs systemd-nspawn: apt-get install systemd-container"
[ ! -e "$WORK" ] || die "$WORK exists: remove it or set WORK="

cleanup() {
  set +e
  [ -n "$LEADER" ] && nsenter -t "$LEADER" -a systemctl poweroff >/dev/null 2>&1
  [ -n "$NSPAWN_PID" ] && { timeout 20 tail --pid="$NSPAWN_PID" -f /dev/null; kill "$NSPAWN_PID" 2>/dev/null; }
  mountpoint -q "$MNT/merged" && umount "$MNT/merged"
  mountpoint -q "$MNT/rw" && umount "$MNT/rw"
  rm -rf "$MNT"
  rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn /run/systemd/nspawn-root \
    2>/dev/null
  [ -n "$BROKER_PID" ] && { touch "$WORK/stop-broker"; sleep 1; kill "$BROKER_PID" 2>/dev/null; }
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

in_container() { nsenter -t "$LEADER" -a "$@"; }
prop() { in_container systemctl show -p "$2" --value "$1"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for: $what"
    sleep 1
  done
}

mkdir -p "$WORK"
SRC=$REPO
if [ "${SOURCE:-head}" = head ]; then
  SRC="$WORK/src"
  mkdir -p "$SRC"
  git -C "$REPO" archive HEAD | tar -x -C "$SRC"
fi
say "staged install with a real venv into $ROOT, from $SRC ($(git -C "$REPO" rev-parse --short HEAD))"
DESTDIR="$ROOT" PYTHON="$PYTHON" PIP_INSTALL_ARGS=-q bash "$SRC/deploy/install.sh" \
  --role agent,cloud,collect --no-jetson --no-gpu --no-rapl >"$WORK/install.log" 2>&1 \
  || die "install.sh failed: $(tail -5 "$WORK/install.log")"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! grep -q expand_config_argv "$SITE/edgecascade/cli.py"; then
  say "edgecascade/cli.py does not expand --config yet: patching the venv's copy (see deploy/config.py)"
  "$VENV/bin/python" - "$SITE/edgecascade/cli.py" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = "    parser = build_parser()\n    args = parser.parse_args(argv)\n"
new = ("    parser = build_parser()\n    from deploy.config import ConfigError, expand_config_argv\n\n"
       "    try:\n        argv = expand_config_argv(sys.argv[1:] if argv is None else argv, parser)\n"
       "    except ConfigError as exc:\n        parser.error(str(exc))\n    args = parser.parse_args(argv)\n")
assert old in text, "dispatcher changed: patch by hand"
open(path, "w").write(text.replace(old, new))
EOF
fi
MODELS="$ROOT/opt/edgecascade/models/fashion-mnist"
if [ ! -e "$MODELS/card.json" ]; then
  say "no trained models in the repository: tiny ones from tests/tinymodels.py"
  mkdir -p "$MODELS"
  model_py="$REPO/.venv/bin/python"  # writing them needs onnx, which the device venv does not have
  if ! "$model_py" -c "import onnx" 2>/dev/null; then
    model_py="$VENV/bin/python" && "$model_py" -m pip install -q onnx
  fi
  PYTHONPATH="$SRC/tests" "$model_py" -c \
    "import sys; from pathlib import Path; from tinymodels import write_tiny_model_dir as w; w(Path(sys.argv[1]))" \
    "$MODELS"
fi

say "private Mosquitto on the host"
"$VENV/bin/python" - "$WORK" >"$WORK/broker.log" 2>&1 <<'EOF' &
import json, os, sys, time
from pathlib import Path
from broker.launcher import BrokerProcess
work = Path(sys.argv[1])
broker = BrokerProcess(work / "broker")
broker.start()
broker.add_users(["smoke01"])
users = {u: broker.credentials(u).password for u in ("smoke01", "cloud", "collector")}
(work / "broker.json").write_text(json.dumps({"port": broker.port, "passwords": users}))
while not (work / "stop-broker").exists():
    time.sleep(0.5)
broker.stop()
EOF
BROKER_PID=$!
wait_for 30 "the broker" test -s "$WORK/broker.json"
field() { "$VENV/bin/python" -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" \
  "$WORK/broker.json" "$1"; }
PORT=$(field 'd["port"]')
CRED="$ROOT/etc/edgecascade/credentials"
for user in smoke01 cloud collector; do
  (umask 077 && field "d['passwords']['$user']" >"$CRED/$user.mqtt-password")
done
sed -i "s/mqtt.example.net:1883/127.0.0.1:$PORT/; s/dataset:fashion-mnist:test\"/dataset:fashion-mnist:test:$SAMPLES\"/" \
  "$ROOT"/etc/edgecascade/*.toml

UNITS="$WORK/units"
cp -a "$ROOT/etc/systemd/system" "$UNITS"
cat >"$UNITS/edgecascade-smoke.target" <<'EOF'
[Unit]
Description=edgecascade smoke test
Wants=edgecascade-collect.service edgecascade-cloud@w1.service edgecascade-agent@smoke01.service
EOF
mkdir -p "$UNITS/edgecascade-agent@.service.d"
printf '[Unit]\nAfter=edgecascade-collect.service edgecascade-cloud@w1.service\n' \
  >"$UNITS/edgecascade-agent@.service.d/smoke-order.conf"

say "booting systemd in a container (overlay of /, writes to tmpfs)"
mkdir -p "$MNT/rw" "$MNT/merged"
mount -t tmpfs -o size=2g tmpfs "$MNT/rw"
mkdir "$MNT/rw/upper" "$MNT/rw/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$MNT/rw/upper,workdir=$MNT/rw/work" "$MNT/merged"
systemd-nspawn -D "$MNT/merged" --register=no --keep-unit --link-journal=no -M ec-smoke --console=pipe \
  --bind-ro="$UNITS:/etc/systemd/system" --bind-ro="$ROOT/etc/edgecascade:/etc/edgecascade" \
  --bind-ro="$ROOT/opt/edgecascade:/opt/edgecascade" -b systemd.unit=edgecascade-smoke.target \
  >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
wait_for 30 "the container's systemd" pgrep -P "$NSPAWN_PID"
LEADER=$(pgrep -P "$NSPAWN_PID" | head -1)

agent_done() { [ "$(prop edgecascade-agent@smoke01.service SubState)" = dead ] \
  && [ "$(prop edgecascade-agent@smoke01.service ExecMainStartTimestampMonotonic)" != 0 ]; }
wait_for 120 "the agent's run" agent_done
summary=$(in_container journalctl -o cat -u edgecascade-agent@smoke01.service | grep '"run_id"' | tail -1)
say "agent: result $(prop edgecascade-agent@smoke01.service Result), summary $summary"
[ "$(prop edgecascade-agent@smoke01.service Result)" = success ] || die "the agent failed"
"$VENV/bin/python" -c "import json,sys; s=json.loads(sys.argv[1]); assert s['samples']==$SAMPLES and \
s['exits'].get('cloud',0)>0 and s['fallbacks']==0, s" "$summary" || die "offloads were not answered"
for unit in edgecascade-cloud@w1.service edgecascade-collect.service; do
  [ "$(prop "$unit" ActiveState)" = active ] || die "$unit is $(prop "$unit" ActiveState)"
  say "$unit: active, status '$(prop "$unit" StatusText)', watchdog $(prop "$unit" WatchdogUSec), \
exposure $(in_container systemd-analyze security "$unit" | tail -1 | sed -E 's/.*: ([0-9.]+) .*/\1/')"
done
rows() { in_container /usr/bin/python3 -c "import sqlite3; print(sqlite3.connect( \
'file:/var/lib/private/edgecascade/collect/results.db?mode=ro', uri=True).execute( \
'select count(*) from inferences').fetchone()[0])"; }
wait_for 30 "$SAMPLES rows in the collector's SQLite" test "$(rows)" = "$SAMPLES"
say "collector: $(rows) rows in /var/lib/edgecascade/collect/results.db"

say "freezing the cloud worker (SIGSTOP): the watchdog must kill and restart it"
before=$(prop edgecascade-cloud@w1.service NRestarts)
in_container kill -STOP "$(prop edgecascade-cloud@w1.service MainPID)"
restarted() { [ "$(prop edgecascade-cloud@w1.service NRestarts)" -gt "$before" ] \
  && [ "$(prop edgecascade-cloud@w1.service ActiveState)" = active ]; }
wait_for 150 "a watchdog restart" restarted
in_container journalctl -o cat -u edgecascade-cloud@w1.service | grep -q "Watchdog timeout" \
  || die "restarted, but not by the watchdog"
say "PASS"
