#!/usr/bin/env bash
# Install (or --uninstall) edgecascade on a fleet host: systemd units, config examples, a Mosquitto drop-in
# and a virtual environment with the project. `make install` runs it; DESTDIR stages into another root.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: deploy/install.sh [--role ROLES] [options]        (as root, or with DESTDIR/--destdir)

roles (comma-separated; default all):
  agent    edgecascade-agent@.service, /etc/edgecascade/agent.toml, venv with .[device] (+jetson on Jetson)
  cloud    edgecascade-cloud@.service, /etc/edgecascade/cloud.toml, venv with .[cloud]
  collect  edgecascade-collect.service, /etc/edgecascade/collect.toml, venv with .[device,db]
  broker   /etc/mosquitto/conf.d/edgecascade*.conf, /etc/mosquitto/edgecascade.acl, and the accounts file
           /var/lib/mosquitto/edgecascade-dynsec.json with one admin account (password in
           /etc/mosquitto/edgecascade-admin.pw); needs PYTHON (standard library only)
  all      all of the above

options:
  --prefix DIR        where the venv and models go (default $PREFIX or /opt/edgecascade)
  --destdir DIR       stage everything under DIR (default $DESTDIR); units still name PREFIX paths
  --no-venv           skip the venv (units and config only)
  --jetson/--no-jetson  agent drop-in for NVIDIA Jetson (default: when /etc/nv_tegra_release exists)
  --gpu/--no-gpu      cloud drop-in for NVIDIA GPUs (default: when /dev/nvidiactl exists)
  --rapl/--no-rapl    agent drop-in + tmpfiles rule for reading RAPL counters (default: when present)
  --uninstall         remove what install put there; edited configs, credentials and a Mosquitto
                      accounts file holding accounts are kept (listed), unless --purge
  --purge             with --uninstall: remove those too
environment: PYTHON (python for the venv, default python3; >= 3.8), PIP_INSTALL_ARGS (extra pip arguments,
  e.g. --find-links /srv/wheels for offline hosts or the Jetson onnxruntime-gpu wheel), DYNSEC_PLUGIN
  (Mosquitto's mosquitto_dynamic_security.so; default: found under /usr/lib)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/edgecascade}
PYTHON=${PYTHON:-python3}
ROLES=all
VENV=1 UNINSTALL=0 PURGE=0 JETSON=auto GPU=auto RAPL=auto

while [ $# -gt 0 ]; do
  case $1 in
    --role) ROLES=${2:?--role needs a value}; shift ;;
    --role=*) ROLES=${1#*=} ;;
    --prefix) PREFIX=${2:?--prefix needs a value}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --destdir) DESTDIR=${2:?--destdir needs a value}; shift ;;
    --destdir=*) DESTDIR=${1#*=} ;;
    --no-venv) VENV=0 ;;
    --jetson) JETSON=1 ;; --no-jetson) JETSON=0 ;;
    --gpu) GPU=1 ;; --no-gpu) GPU=0 ;;
    --rapl) RAPL=1 ;; --no-rapl) RAPL=0 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

die() { echo "install.sh: $*" >&2; exit 1; }
# PREFIX is written into units with sed: keep it to plain path characters.
[[ $PREFIX == /* && $PREFIX =~ ^[A-Za-z0-9._/+-]+$ ]] || die "PREFIX must be an absolute plain path: $PREFIX"
PREFIX=${PREFIX%/}
DESTDIR=${DESTDIR%/}
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "installing into / needs root (or stage with DESTDIR=/some/dir)"
fi

declare -A WANT=()
IFS=, read -r -a _roles <<<"$ROLES"
for r in "${_roles[@]}"; do
  case $r in
    agent|cloud|collect|broker) WANT[$r]=1 ;;
    all) WANT[agent]=1 WANT[cloud]=1 WANT[collect]=1 WANT[broker]=1 ;;
    *) die "unknown role '$r' (agent, cloud, collect, broker, all)" ;;
  esac
done
has() { [ -n "${WANT[$1]:-}" ]; }

# Hardware drop-ins: detected on the live host only; a staged install (DESTDIR) takes them from the flags.
detect() { # detect FLAGVALUE TESTPATH
  if [ "$1" = auto ]; then
    if [ -z "$DESTDIR" ] && [ -e "$2" ]; then echo 1; else echo 0; fi
  else echo "$1"; fi
}
JETSON=$(detect "$JETSON" /etc/nv_tegra_release)
GPU=$(detect "$GPU" /dev/nvidiactl)
RAPL=$(detect "$RAPL" /sys/class/powercap/intel-rapl:0)

ETC="$DESTDIR/etc"
UNITDIR="$ETC/systemd/system"
CONFDIR="$ETC/edgecascade"
MOSQDIR="$ETC/mosquitto"
MOSQVAR="$DESTDIR/var/lib/mosquitto"  # the plugin rewrites its accounts file: it lives where mosquitto may write
DYNSEC_FILE="$MOSQVAR/edgecascade-dynsec.json"
ADMIN_PW="$MOSQDIR/edgecascade-admin.pw"
ROOT_PREFIX="$DESTDIR$PREFIX"
LIVE=0
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then LIVE=1; fi

# What each role owns: "source|destination" pairs. Units and configs get /opt/edgecascade -> PREFIX.
files_for() {
  case $1 in
    agent)
      echo "deploy/edgecascade-agent@.service|$UNITDIR/edgecascade-agent@.service"
      [ "$JETSON" = 1 ] && echo "deploy/jetson/agent-jetson.conf|$UNITDIR/edgecascade-agent@.service.d/jetson.conf"
      if [ "$RAPL" = 1 ]; then
        echo "deploy/x86/agent-rapl.conf|$UNITDIR/edgecascade-agent@.service.d/rapl.conf"
        echo "deploy/tmpfiles.d/edgecascade-rapl.conf|$ETC/tmpfiles.d/edgecascade-rapl.conf"
        echo "deploy/sysusers.d/edgecascade.conf|$ETC/sysusers.d/edgecascade.conf"
      fi ;;
    cloud)
      echo "deploy/edgecascade-cloud@.service|$UNITDIR/edgecascade-cloud@.service"
      [ "$GPU" = 1 ] && echo "deploy/gpu/cloud-gpu.conf|$UNITDIR/edgecascade-cloud@.service.d/gpu.conf" ;;
    collect)
      echo "deploy/edgecascade-collect.service|$UNITDIR/edgecascade-collect.service" ;;
    broker)
      echo "broker/edgecascade.conf|$MOSQDIR/conf.d/edgecascade.conf"
      echo "deploy/mosquitto-edgecascade.conf|$MOSQDIR/conf.d/edgecascade-listener.conf"
      echo "broker/edgecascade.acl|$MOSQDIR/edgecascade.acl" ;;
  esac
  return 0
}
SERVICE_ROLES=(agent cloud collect)

render() { # render SRC DST: copy with the prefix substituted, mode 0644
  install -d -m 0755 "$(dirname "$2")"
  sed "s|/opt/edgecascade|$PREFIX|g" "$REPO/$1" >"$2.tmp"
  chmod 0644 "$2.tmp"
  mv -f "$2.tmp" "$2"
  echo "installed $2"
}

extras() {
  local list=()
  has agent && list+=(device) && [ "$JETSON" = 1 ] && list+=(jetson)
  has cloud && list+=(cloud)
  has collect && list+=(device db)
  if [ ${#list[@]} -gt 0 ]; then printf '%s\n' "${list[@]}" | sort -u | paste -sd, -; fi
}

do_install() {
  for role in agent cloud collect broker; do
    has "$role" || continue
    while IFS='|' read -r src dst; do
      [ -n "$src" ] && render "$src" "$dst"
    done < <(files_for "$role")
  done

  local installed_service=0
  for role in "${SERVICE_ROLES[@]}"; do
    has "$role" || continue
    installed_service=1
    # The shipped example is always refreshed; the live config is written only where there is none.
    render "deploy/etc/$role.toml" "$CONFDIR/$role.toml.example"
    if [ -e "$CONFDIR/$role.toml" ]; then
      echo "kept $CONFDIR/$role.toml (exists; compare with $role.toml.example)"
    else
      cp -p "$CONFDIR/$role.toml.example" "$CONFDIR/$role.toml"
      echo "installed $CONFDIR/$role.toml"
    fi
  done
  if [ "$installed_service" = 1 ]; then
    install -d -m 0700 "$CONFDIR/credentials"  # root-only: MQTT passwords and the database URL
  fi

  if has broker; then
    local plugin=${DYNSEC_PLUGIN:-}
    if [ -z "$plugin" ]; then
      plugin=$(ls /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
        2>/dev/null | head -n 1 || true)
    fi
    [ -n "$plugin" ] || die "mosquitto_dynamic_security.so not found: install mosquitto (>= 2.0) or set DYNSEC_PLUGIN"
    local listener="$MOSQDIR/conf.d/edgecascade-listener.conf"
    sed -i "s|^plugin /.*mosquitto_dynamic_security.so\$|plugin $plugin|" "$listener"
    if [ -e "$DYNSEC_FILE" ]; then
      echo "kept $DYNSEC_FILE (accounts; manage them with mosquitto_ctrl)"
    else
      install -d -m 0755 "$MOSQVAR"
      "$PYTHON" "$REPO/broker/dynsec.py" init "$DYNSEC_FILE" --admin-password-file "$ADMIN_PW"
    fi
    # The plugin reads and rewrites its file after Mosquitto drops to user mosquitto.
    if [ -z "$DESTDIR" ] && getent passwd mosquitto >/dev/null; then chown mosquitto: "$DYNSEC_FILE"; fi
  fi

  if (has agent || has cloud) && [ -d "$REPO/models" ] && [ -n "$(ls -A "$REPO/models")" ]; then
    install -d -m 0755 "$ROOT_PREFIX/models"
    cp -R "$REPO/models/." "$ROOT_PREFIX/models/"
    chmod -R u+rwX,go+rX,go-w "$ROOT_PREFIX/models"
    echo "installed $ROOT_PREFIX/models"
  fi

  local ex
  ex=$(extras)
  if [ -n "$ex" ]; then
    local pip_extra=()
    read -r -a pip_extra <<<"${PIP_INSTALL_ARGS:-}"  # a list of words on purpose
    local venv_cmd=("$PYTHON" -m venv "$ROOT_PREFIX/venv")
    local pip_cmd=("$ROOT_PREFIX/venv/bin/python" -m pip install --upgrade "${pip_extra[@]}" "${REPO}[$ex]")
    if [ "$VENV" = 1 ]; then
      [ -n "$DESTDIR" ] && echo "note: a venv is not relocatable: $ROOT_PREFIX/venv only works once moved to $PREFIX"
      echo "running: ${venv_cmd[*]}"
      "${venv_cmd[@]}"
      echo "running: ${pip_cmd[*]}"
      "${pip_cmd[@]}"
    else
      echo "skipped (--no-venv): ${venv_cmd[*]}"
      echo "skipped (--no-venv): ${pip_cmd[*]}"
    fi
  fi

  if [ "$LIVE" = 1 ]; then
    if has agent && [ "$RAPL" = 1 ]; then systemd-sysusers edgecascade.conf; fi
    systemctl daemon-reload
    if has broker; then systemctl try-reload-or-restart mosquitto.service || true; fi
  fi
  next_steps
}

next_steps() {
  cat <<EOF

next steps:
  1. edit $ETC/edgecascade/<role>.toml (broker address, model directory, policy ...)
  2. put each secret into $ETC/edgecascade/credentials/ (root:root 0600, one line each):
       <device id>.mqtt-password  cloud.mqtt-password  collector.mqtt-password  collect.db-url (optional)
  3. systemctl enable --now edgecascade-agent@<device id>.service | edgecascade-cloud@<worker>.service |
     edgecascade-collect.service
EOF
  if has broker; then
    cat <<EOF
  broker: create the accounts with mosquitto_ctrl as edgecascade-admin (commands in
     $MOSQDIR/conf.d/edgecascade-listener.conf); it listens on 127.0.0.1 until you enable its TLS listener
EOF
  fi
}

remove() { # remove PATH: a file or a symlink, saying so
  if [ -e "$1" ] || [ -L "$1" ]; then rm -f "$1" && echo "removed $1"; fi
  return 0
}

prune() { # prune DIR STOP: remove DIR and its parents while empty, up to (not including) STOP
  local d=$1
  while [ "$d" != "$2" ] && [ "$d" != "/" ] && [ "$d" != "." ]; do
    # A directory an earlier prune already removed is passed over, so its parents still go.
    if [ -d "$d" ]; then rmdir "$d" 2>/dev/null || break; fi
    d=$(dirname "$d")
  done
  return 0
}

do_uninstall() {
  if [ "$LIVE" = 1 ]; then
    local units
    units=$(systemctl list-units --all --plain --no-legend --type=service 'edgecascade-*' | awk '{print $1}')
    # shellcheck disable=SC2086 # one unit name per word
    if [ -n "$units" ]; then systemctl disable --now $units || true; fi
  fi
  # Every drop-in and optional file, whatever flags install was given.
  JETSON=1 GPU=1 RAPL=1
  local kept=()
  for role in agent cloud collect broker; do
    has "$role" || continue
    while IFS='|' read -r _src dst; do
      remove "$dst"
      case $dst in *.service.d/*) prune "$(dirname "$dst")" "$UNITDIR" ;; esac
    done < <(files_for "$role")
  done
  # `systemctl enable` symlinks left by a host that is not running systemd now (images, staged roots).
  for role in "${SERVICE_ROLES[@]}"; do
    has "$role" || continue
    for link in "$UNITDIR"/*.wants/edgecascade-"$role"*.service; do
      [ -L "$link" ] && remove "$link" && prune "$(dirname "$link")" "$UNITDIR"
    done
    local cfg="$CONFDIR/$role.toml"
    if [ -e "$cfg" ] && [ "$PURGE" = 0 ] && ! cmp -s "$cfg" "$cfg.example"; then
      kept+=("$cfg (edited)")
    else
      remove "$cfg"
    fi
    remove "$cfg.example"
  done
  if [ -d "$CONFDIR/credentials" ]; then
    if [ "$PURGE" = 1 ]; then
      rm -rf "$CONFDIR/credentials" && echo "removed $CONFDIR/credentials"
    elif [ -z "$(ls -A "$CONFDIR/credentials")" ]; then
      rmdir "$CONFDIR/credentials" && echo "removed $CONFDIR/credentials"
    else
      kept+=("$CONFDIR/credentials/ (secrets)")
    fi
  fi
  prune "$CONFDIR" "$ETC"
  if has broker; then
    # Kept while it holds accounts besides the admin (and then the admin's password with it).
    if [ -e "$DYNSEC_FILE" ] && [ "$PURGE" = 0 ] && [ "$(grep -c '"username"' "$DYNSEC_FILE")" -gt 1 ]; then
      kept+=("$DYNSEC_FILE (accounts)" "$ADMIN_PW (its admin password)")
    else
      remove "$DYNSEC_FILE"
      remove "$ADMIN_PW"
    fi
  fi
  # The venv and models serve every role: they go when the last service role does.
  if has agent && has cloud && has collect; then
    if [ -d "$ROOT_PREFIX/venv" ]; then rm -rf "$ROOT_PREFIX/venv" && echo "removed $ROOT_PREFIX/venv"; fi
    if [ -d "$ROOT_PREFIX/models" ]; then rm -rf "$ROOT_PREFIX/models" && echo "removed $ROOT_PREFIX/models"; fi
    prune "$ROOT_PREFIX" "$DESTDIR$(dirname "$PREFIX")"
  fi
  # A staged root (DESTDIR) is ours: leave no empty directories behind. On a live host the system's own
  # directories (/etc/systemd/system, /etc/mosquitto/conf.d ...) stay, empty or not.
  if [ -n "$DESTDIR" ]; then
    for d in "$UNITDIR" "$ETC/tmpfiles.d" "$ETC/sysusers.d" "$MOSQDIR/conf.d" "$CONFDIR" \
      "$ROOT_PREFIX" "$MOSQVAR"; do
      prune "$d" "$DESTDIR"
    done
  fi
  if [ "$LIVE" = 1 ]; then
    systemctl daemon-reload
    if has broker; then systemctl try-reload-or-restart mosquitto.service || true; fi
  fi
  if [ ${#kept[@]} -gt 0 ]; then
    echo "kept (remove by hand, or rerun with --uninstall --purge):"
    printf '  %s\n' "${kept[@]}"
  fi
  echo "service state (outboxes, SQLite results) stays in /var/lib/edgecascade and /var/lib/private/edgecascade"
}

if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
