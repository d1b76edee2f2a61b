#!/bin/bash
# parts.sh - several guest scripts ("parts") in one boot of the linux-initiator guest, one after
# the other (tests/interop/run.py, run_guests).
#
# $FILES_DIR/parts.list has a line per part, in the order to run them:
#   NAME SCRIPT TIMEOUT MULTIPATH
# and $FILES_DIR/NAME.env the part's own environment (TARGET_IQN, the portals of its targets,
# HOST_SYNC, its variables), in `NAME=value` lines.  Each part:
#   - runs as `bash $FILES_DIR/SCRIPT` under `timeout TIMEOUT`, in its own process group, with
#     $OUT_DIR/NAME as its $OUT_DIR and, when MULTIPATH is 1, multipathd running (started with
#     the configuration the guest booted with, as the harness's --multipath does)
#   - leaves NAME/rc (its exit status), NAME/wall (its seconds) and NAME/dmesg (the kernel log
#     lines of its run)
# and then the guest is put back as it booted (reset_guest): what is left of the part's
# processes is killed, file systems under /mnt unmounted, multipath maps removed and
# multipathd stopped, every iSCSI session logged out, the node, discovery and iface records
# deleted, /tmp emptied.  When the guest cannot be made clean again, the remaining parts do not
# run (NAME/skipped says why).  A part that fails does not stop the next one; this script exits
# 0 when every part did.
[[ -x /interop/guest-init ]] || { echo "parts.sh runs in the linux-initiator guest only"; exit 2; }
. "$INTEROP_LIB"
[[ -f $FILES_DIR/parts.list ]] || { echo "parts.list missing: see tests/interop/run.py"; exit 2; }
OUT_BASE=$OUT_DIR
BOOT_MPCONF=/run/parts.multipath.conf
[[ -e /etc/multipath.conf ]] && cp /etc/multipath.conf "$BOOT_MPCONF"

restore_multipath_conf() {
  if [[ -e $BOOT_MPCONF ]]; then cp "$BOOT_MPCONF" /etc/multipath.conf
  else rm -f /etc/multipath.conf; fi
}

start_multipathd() {
  local i
  restore_multipath_conf
  [[ -e /etc/multipath.conf ]] \
    || printf 'defaults {\n\tuser_friendly_names yes\n\tfind_multipaths no\n}\n' >/etc/multipath.conf
  multipathd || return 1
  for i in $(seq 100); do
    multipathd show daemon >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

stop_multipathd() {
  local i
  pgrep -x multipathd >/dev/null || return 0
  multipathd shutdown >/dev/null 2>&1
  for i in $(seq 100); do
    pgrep -x multipathd >/dev/null || return 0
    sleep 0.2
  done
  pkill -KILL -x multipathd
}

# leftovers: what a part left that reset_guest must clear, one line each (nothing: clean).
leftovers() {
  awk '$2 ~ "^/mnt/" { print "mounted: " $2 }' /proc/mounts
  dmsetup ls --target multipath 2>/dev/null | awk '$1 != "No" { print "multipath map: " $1 }'
  iscsiadm -m session 2>/dev/null | sed 's/^/session: /'
  pgrep -x multipathd >/dev/null && echo "multipathd running"
  return 0
}

reset_guest() {
  local pgid=$1 m portal type rest i
  ((pgid > 1)) && kill -KILL -- "-$pgid" 2>/dev/null
  for m in $(awk '$2 ~ "^/mnt/" { print $2 }' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  for m in $(dmsetup ls --target multipath 2>/dev/null | awk '$1 != "No" { print $1 }'); do
    dmsetup message "$m" 0 fail_if_no_path >/dev/null 2>&1
  done
  multipath -F >/dev/null 2>&1
  if iscsiadm -m session >/dev/null 2>&1; then
    timeout 30 iscsiadm -m node --logoutall=all >/dev/null 2>&1
  fi
  for i in $(seq 100); do
    compgen -G '/sys/class/iscsi_session/session*' >/dev/null || break
    sleep 0.2
  done
  stop_multipathd
  for m in $(dmsetup ls --target multipath 2>/dev/null | awk '$1 != "No" { print $1 }'); do
    dmsetup remove --force "$m" >/dev/null 2>&1
  done
  restore_multipath_conf
  iscsiadm -m node -o delete >/dev/null 2>&1
  while read -r portal _ type rest; do
    [[ -n $type ]] && iscsiadm -m discoverydb -t "$type" -p "$portal" -o delete >/dev/null 2>&1
  done < <(iscsiadm -m discoverydb 2>/dev/null)
  for m in /etc/iscsi/ifaces/*; do
    [[ -f $m ]] && iscsiadm -m iface -I "${m##*/}" -o delete >/dev/null 2>&1
  done
  find /tmp -mindepth 1 -delete 2>/dev/null
  udevadm settle --timeout=10 2>/dev/null
  [[ -z $(leftovers) ]]
}

mapfile -t PARTS <"$FILES_DIR/parts.list"
failed=0 dirty=
for ((n = 0; n < ${#PARTS[@]}; n++)); do
  read -r name script limit multipath <<<"${PARTS[n]}"
  out=$OUT_BASE/$name
  mkdir -p "$out"
  if [[ -n $dirty ]]; then
    echo "not run: the guest was not clean after an earlier part ($dirty)" >"$out/skipped"
    echo "PART $name ($script): not run, the guest was not clean after an earlier part"
    failed=1
    continue
  fi
  echo "PART $name ($script, limit ${limit}s) starts at t=$(t)s"
  rc=0
  if [[ $multipath == 1 ]] && ! start_multipathd; then
    echo "multipathd did not start" >"$out/stderr"
    rc=125
  fi
  klog0=$(dmesg | wc -l)
  t0=$(t)
  if ((rc == 0)); then
    (
      set -a
      . "$FILES_DIR/$name.env"
      set +a
      OUT_DIR=$out
      cd "$JOB_DIR" || exit 125
      exec timeout -k 10 "$limit" bash "$FILES_DIR/$script"
    ) >"$out/stdout" 2>"$out/stderr" </dev/null &
    pid=$!
    wait "$pid" || rc=$?
  fi
  awk -v a="$t0" -v b="$(t)" 'BEGIN { printf "%.1f\n", b - a }' >"$out/wall"
  echo "$rc" >"$out/rc"
  dmesg | sed -n "$((klog0 + 1)),\$p" >"$out/dmesg"
  echo "PART $name ($script): exit status $rc after $(cat "$out/wall")s"
  ((rc == 0)) || failed=1
  if ((n + 1 < ${#PARTS[@]})); then
    t0=$(t)
    if ! reset_guest "${pid:-0}"; then
      dirty="$name left: $(leftovers | tr '\n' ';')"
      echo "the guest is not clean after $name: $dirty"
    fi
    echo "guest reset after $name in $(awk -v a="$t0" -v b="$(t)" 'BEGIN { printf "%.1f", b - a }')s"
  fi
  unset pid
done
exit "$failed"
