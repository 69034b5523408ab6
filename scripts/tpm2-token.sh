#!/usr/bin/env bash
# keymgr's second real PKCS#11 token for the test suite: a software TPM 2.0
# (swtpm) behind the tpm2-abrmd resource manager, exposed by tpm2-pkcs11.
# Debian 12 packages only; runs unattended (CI: root, no network but apt).
#
# Usage: scripts/tpm2-token.sh COMMAND
#   install   apt-get install the packages that are missing (apt-get update once, only then)
#   setup     install + start + token 'keymgr-tpm' with keys 'rsa-kek' (RSA-2048) and
#             'ec-kek' (P-256); clears any PIN lockout; idempotent (~4 s, ~0.6 s when up)
#   start     start the daemons on existing state (after 'stop'; the token "comes back")
#   stop      orderly stop: TPM2_Shutdown first (an unclean stop counts as a failed
#             PIN try on the next start), then tpm2-abrmd, dbus-daemon, swtpm
#   stop --keep-bus
#             the same but the private dbus-daemon keeps running: token removal for a
#             process that must get the token back after 'start' with C_Finalize +
#             C_Initialize (its GLib bus connection dies with the bus, and for good)
#   unlock    clear the TPM's dictionary-attack lockout (wrong PINs) at once
#   reset     stop + delete the state directory
#   status    daemons, swtpm port, lockout counter; exit 0 only if all three run
#
# Clients: source "$KEYMGR_TPM_DIR/env.sh" (tests: tests/tokens/tpm.py) BEFORE the
# PKCS#11 module is loaded: tpm2-pkcs11 finds its store and the resource manager
# through those variables.
#
# Settings (environment):
#   KEYMGR_TPM_DIR             state directory (default /tmp/keymgr-tpm-$UID); at most
#                              80 characters of [A-Za-z0-9_./-] (it holds unix sockets)
#   KEYMGR_TPM_PORT            swtpm's TCP port (control channel: port+1). Unset: try
#                              2321, 2323, ... and take the first pair that is free
#   KEYMGR_TPM_DA_MAX_TRIES    wrong PINs before the TPM locks out (default 3)
#   KEYMGR_TPM_DA_RECOVERY_S   seconds to forgive one wrong PIN (default 10; swtpm: 1000)
#   TSS2_LOG                   tpm2-tss logging, default all+none (silent); unset to debug
#
# Network: swtpm listens on 127.0.0.1 only; dbus-daemon and tpm2-abrmd talk over a
# unix socket in the state directory. Nothing touches the system D-Bus or systemd.
set -euo pipefail

readonly D=${KEYMGR_TPM_DIR:-/tmp/keymgr-tpm-$(id -u)}
readonly LABEL=keymgr-tpm USER_PIN=1234 SO_PIN=sopin1234
readonly RSA_LABEL=rsa-kek EC_LABEL=ec-kek
readonly DA_MAX_TRIES=${KEYMGR_TPM_DA_MAX_TRIES:-3}
readonly DA_RECOVERY_S=${KEYMGR_TPM_DA_RECOVERY_S:-10}
# libtss2-tcti-tabrmd0: the clients' side of tpm2-abrmd (not a dependency of tpm2-abrmd);
# libtss2-tcti-swtpm0: tpm2-abrmd's (and our tpm2_shutdown's) way to swtpm.
readonly PACKAGES=(swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtss2-tcti-swtpm0
                   libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus-daemon)
readonly MARKER=$D/.keymgr-tpm   # marks a directory as ours: 'reset' deletes only those

# What tpm2-tools, tpm2_ptool and the PKCS#11 module need (written to env.sh below).
export DBUS_SESSION_BUS_ADDRESS=unix:path=$D/dbus.sock
export TPM2TOOLS_TCTI=tabrmd:bus_type=session
export TPM2_PKCS11_TCTI=tabrmd:bus_type=session
export TPM2_PKCS11_STORE=$D/store
export TSS2_LOG=${TSS2_LOG-all+none}

log() { echo "[tpm2-token] $*" >&2; }
die() { log "error: $*"; exit 1; }

# poll TENTHS CMD...: run CMD every 0.1 s until it succeeds, at most TENTHS times.
poll() {
  local n=$1; shift
  until "$@"; do n=$((n - 1)); [ $n -gt 0 ] || return 1; sleep 0.1; done
}

check_settings() {
  # The path goes into a D-Bus address, a unix socket (108-byte limit) and env.sh.
  [[ $D =~ ^/[A-Za-z0-9_./-]+$ ]] || die "KEYMGR_TPM_DIR must be an absolute path of [A-Za-z0-9_./-]: $D"
  [ ${#D} -le 80 ] || die "KEYMGR_TPM_DIR is too long for a unix socket path (max 80): $D"
  [[ $DA_MAX_TRIES =~ ^[0-9]+$ && $DA_RECOVERY_S =~ ^[0-9]+$ ]] \
    || die "KEYMGR_TPM_DA_MAX_TRIES and KEYMGR_TPM_DA_RECOVERY_S must be numbers"
}

# --- processes, by the pid files we write ------------------------------------

# running NAME: the pid in $D/NAME.pid is alive, not a zombie, runs the program we
# started, and belongs to this state directory: $D/ is in its command line or its
# environment (tpm2-abrmd's command line names only the port). A recycled pid or a
# daemon of another state directory is not ours.
running() {
  local pid; pid=$(cat "$D/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${COMM[$1]}" ] || return 1
  cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' | grep -qF -- "$D/" || return 1
  ! grep -qs '^State:.*Z' "/proc/$pid/status"
}
declare -rA COMM=([swtpm]=swtpm [dbus]=dbus-daemon [abrmd]=tpm2-abrmd)

# stop_daemon NAME: SIGTERM, wait up to 5 s, then SIGKILL. Clears a stale pid file.
stopped() { ! running "$1"; }
stop_daemon() {
  local name=$1 pid
  if running "$name"; then
    pid=$(cat "$D/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    poll 50 stopped "$name" || { kill -KILL "$pid" 2>/dev/null || true; poll 20 stopped "$name" || true; }
    log "stopped $name (pid $pid)"
  fi
  rm -f "$D/$name.pid"
}

# --- install -------------------------------------------------------------------

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}); run '$0 install' as root"
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
}

# --- start -------------------------------------------------------------------------

# Every daemon gets stdin/stdout/stderr of its own (a caller capturing our output
# must not wait for daemons) and not fd 9, our lock.

start_swtpm() {
  local port=${KEYMGR_TPM_PORT:-2321} tries=1 err
  [ -n "${KEYMGR_TPM_PORT:-}" ] || tries=20
  while :; do
    # not-need-init,startup-clear: swtpm sends TPM2_Startup itself, no ctrl dance.
    # --daemon returns once both sockets listen; errors go to the log file.
    : > "$D/swtpm.log"
    if swtpm socket --tpm2 --tpmstate dir="$D/tpmstate" \
         --server type=tcp,port="$port",bindaddr=127.0.0.1 \
         --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
         --flags not-need-init,startup-clear \
         --pid file="$D/swtpm.pid" --log file="$D/swtpm.log",level=1 \
         --daemon >> "$D/swtpm.log" 2>&1 < /dev/null 9>&-; then
      echo "$port" > "$D/port"
      log "swtpm started (pid $(cat "$D/swtpm.pid"), 127.0.0.1:$port-$((port + 1)))"
      return 0
    fi
    err=$(tail -n 5 "$D/swtpm.log")
    tries=$((tries - 1))
    if [[ $err == *"in use"* ]] && [ $tries -gt 0 ]; then port=$((port + 2)); continue; fi
    die "swtpm did not start on 127.0.0.1:$port-$((port + 1)): $err"
  done
}

start_dbus() {
  cat > "$D/dbus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- A private bus for tpm2-abrmd and its clients only (no service activation). -->
<busconfig>
  <type>session</type>
  <listen>$DBUS_SESSION_BUS_ADDRESS</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
  rm -f "$D/dbus.sock"   # left behind by a killed daemon
  # --fork returns once the socket listens.
  dbus-daemon --config-file="$D/dbus.conf" --fork --print-pid \
    > "$D/dbus.pid" 2> "$D/dbus.log" < /dev/null 9>&- || die "dbus-daemon: $(cat "$D/dbus.log")"
  log "dbus-daemon started (pid $(cat "$D/dbus.pid"), $DBUS_SESSION_BUS_ADDRESS)"
}

start_abrmd() {
  # The resource manager swaps transient objects per connection: without it several
  # processes cannot share the TPM and tpm2_ptool fails with TPM_RC_OBJECT_MEMORY.
  # setsid: not killed with the caller's process group (Ctrl-C in pytest).
  setsid tpm2-abrmd --session --allow-root --flush-all \
    --tcti="swtpm:host=127.0.0.1,port=$(cat "$D/port")" \
    > "$D/abrmd.log" 2>&1 < /dev/null 9>&- &
  echo $! > "$D/abrmd.pid"   # setsid execs in place here: $! is tpm2-abrmd
  log "tpm2-abrmd started (pid $!)"
}

tpm_reachable() { timeout 5 tpm2_getcap properties-fixed >/dev/null 2>&1; }

start_daemons() {
  mkdir -p "$D/tpmstate" "$D/store"
  local restarted=0
  if ! running swtpm; then start_swtpm; restarted=1; fi
  if ! running dbus; then start_dbus; restarted=1; fi
  # A new swtpm or bus strands a running tpm2-abrmd: restart it too.
  if [ $restarted = 1 ]; then stop_daemon abrmd; fi
  if ! running abrmd; then start_abrmd; fi
  poll 150 tpm_reachable || die "TPM not reachable through tpm2-abrmd: $(tail -n 20 "$D/abrmd.log")"
  # swtpm stopped without TPM2_Shutdown (killed) counts as one wrong PIN on the next
  # start; three of those lock the token. Forget them (and any wrong PINs).
  tpm2_dictionarylockout --clear-lockout >/dev/null
}

# --- token ----------------------------------------------------------------------------

write_env() {
  # The module's multiarch path (/usr/lib/x86_64-linux-gnu/pkcs11/... on amd64).
  local module
  module=$(dpkg-query -L libtpm2-pkcs11-1 | grep '/pkcs11/libtpm2_pkcs11\.so$') \
    || die "libtpm2_pkcs11.so not found in package libtpm2-pkcs11-1"
  cat > "$D/env.sh.tmp" <<EOF
# Written by scripts/tpm2-token.sh; source before loading $module.
# Needed by PKCS#11 clients (tpm2-pkcs11) and tpm2-tools:
export DBUS_SESSION_BUS_ADDRESS='$DBUS_SESSION_BUS_ADDRESS'
export TPM2_PKCS11_TCTI='$TPM2_PKCS11_TCTI'
export TPM2_PKCS11_STORE='$TPM2_PKCS11_STORE'
export TPM2TOOLS_TCTI='$TPM2TOOLS_TCTI'
export TSS2_LOG='$TSS2_LOG'
# Facts about the token, for tests (not needed by the module):
export KEYMGR_TPM_DIR='$D'
export KEYMGR_TPM_MODULE='$module'
export KEYMGR_TPM_TOKEN_LABEL='$LABEL'
export KEYMGR_TPM_USER_PIN='$USER_PIN'
export KEYMGR_TPM_SO_PIN='$SO_PIN'
export KEYMGR_TPM_RSA_LABEL='$RSA_LABEL'
export KEYMGR_TPM_EC_LABEL='$EC_LABEL'
export KEYMGR_TPM_DA_MAX_TRIES='$DA_MAX_TRIES'
export KEYMGR_TPM_DA_RECOVERY_S='$DA_RECOVERY_S'
EOF
  mv "$D/env.sh.tmp" "$D/env.sh"
}

ptool() { timeout 60 tpm2_ptool "$@" --path "$D/store"; }

# Creates whatever is missing of the token and its two keys (a setup that was
# interrupted half-way is completed, not repeated).
ensure_token() {
  local objects
  if ! objects=$(ptool listobjects --label="$LABEL" 2>/dev/null); then
    # No such token (or no store yet): a primary key in the TPM, then the token.
    ptool listprimaries 2>/dev/null | grep -q 'id: 1$' || ptool init >/dev/null
    ptool addtoken --pid=1 --label="$LABEL" --userpin="$USER_PIN" --sopin="$SO_PIN" >/dev/null
    log "token '$LABEL' created (user PIN $USER_PIN, SO PIN $SO_PIN)"
    objects=
  fi
  # tpm2_ptool stores --id as text: CKA_ID is b"01" / b"02".
  if ! grep -qx "  CKA_LABEL: $RSA_LABEL" <<< "$objects"; then
    ptool addkey --label="$LABEL" --key-label="$RSA_LABEL" --id=01 --algorithm=rsa2048 --userpin="$USER_PIN" >/dev/null
    log "key '$RSA_LABEL' (RSA-2048) created"
  fi
  if ! grep -qx "  CKA_LABEL: $EC_LABEL" <<< "$objects"; then
    ptool addkey --label="$LABEL" --key-label="$EC_LABEL" --id=02 --algorithm=ecc256 --userpin="$USER_PIN" >/dev/null
    log "key '$EC_LABEL' (EC P-256) created"
  fi
}

setup() {
  install_packages
  # A TPM without its state cannot open an old store, and a store without its TPM
  # state is useless: keep both or neither.
  if [ -e "$D/store/tpm2_pkcs11.sqlite3" ] && [ ! -s "$D/tpmstate/tpm2-00.permall" ]; then
    log "TPM state missing: discarding the old tpm2-pkcs11 store"
    stop_all
    rm -rf "$D/store"
  fi
  start_daemons
  # Lockout policy (TPM NV): wrong PINs -> lockout; one forgiven every DA_RECOVERY_S.
  tpm2_dictionarylockout --setup-parameters --max-tries="$DA_MAX_TRIES" \
    --recovery-time="$DA_RECOVERY_S" --lockout-recovery-time="$DA_RECOVERY_S" >/dev/null
  ensure_token
  write_env
  log "ready: source $D/env.sh"
}

# --- stop ----------------------------------------------------------------------------

# stop_all [keep-bus]
stop_all() {
  if running swtpm; then
    # Orderly: TPM2_Shutdown, through tpm2-abrmd when it runs, else straight to swtpm.
    local tcti=$TPM2TOOLS_TCTI
    running abrmd && running dbus || tcti="swtpm:host=127.0.0.1,port=$(cat "$D/port")"
    TPM2TOOLS_TCTI=$tcti timeout 10 tpm2_shutdown >/dev/null 2>&1 \
      || log "warning: TPM2_Shutdown failed; the next start counts one wrong PIN (start clears it)"
  fi
  stop_daemon abrmd
  [ "${1:-}" = keep-bus ] || { stop_daemon dbus; rm -f "$D/dbus.sock"; }
  stop_daemon swtpm
}

status() {
  local name all=0
  for name in swtpm dbus abrmd; do
    if running "$name"; then echo "$name: running (pid $(cat "$D/$name.pid"))"; else echo "$name: stopped"; all=3; fi
  done
  [ -s "$D/port" ] && echo "swtpm port: 127.0.0.1:$(cat "$D/port")"
  if [ $all = 0 ]; then
    # Wrong-PIN counter and policy, as the TPM reports them.
    timeout 5 tpm2_getcap properties-variable 2>/dev/null \
      | grep -E '^TPM2_PT_(LOCKOUT_COUNTER|MAX_AUTH_FAIL|LOCKOUT_INTERVAL):' || true
  fi
  [ -e "$D/env.sh" ] && echo "env: $D/env.sh"
  return $all
}

# --- main ------------------------------------------------------------------------------

main() {
  local cmd=${1:-} keep_bus=
  [ "$cmd" = stop ] && [ "${2:-}" = --keep-bus ] && { keep_bus=keep-bus; shift; }
  [ $# -le 1 ] || cmd=usage
  case "$cmd" in
    install) install_packages; return ;;
    setup|start|stop|unlock|reset|status) ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; return 2 ;;
  esac
  check_settings
  if [ "$cmd" != setup ] && [ ! -e "$MARKER" ]; then
    [ "$cmd" = status ] && { echo "no TPM state in $D"; return 3; }
    if [ ! -e "$D" ] && { [ "$cmd" = stop ] || [ "$cmd" = reset ]; }; then return 0; fi
    die "$D holds no TPM state of ours: run '$0 setup' first"
  fi
  if [ ! -e "$MARKER" ]; then
    mkdir -p "$D"
    [ -z "$(ls -A "$D")" ] || die "$D is not empty and not ours: refusing to use it"
    touch "$MARKER"
  fi
  # One command at a time per state directory (parallel test workers).
  exec 9> "$D/.lock"
  flock -w 120 9 || die "another tpm2-token.sh holds $D/.lock"
  case "$cmd" in
    setup)  setup ;;
    start)  [ -s "$D/tpmstate/tpm2-00.permall" ] || die "no TPM state in $D: run setup"
            start_daemons; write_env; log "started" ;;
    stop)   stop_all $keep_bus ;;
    unlock) running abrmd || die "not running: run '$0 start'"
            tpm2_dictionarylockout --clear-lockout >/dev/null; log "lockout cleared" ;;
    reset)  stop_all; exec 9>&-; rm -rf "$D"; log "removed $D" ;;
    status) status ;;
  esac
}

main "$@"
