#!/bin/bash
# guide_linux.sh - docs/guides/linux-open-iscsi.md, followed as written.
#
# tests/interop/test_guides.py extracts the guide's `<!-- test: guest NAME -->` blocks into
# guide-steps.sh (one function guide_NAME per block, the block's text unchanged) and passes it
# with -f; this script runs them in the guide's order, stops at the first command of a block
# that fails, and checks the results between blocks. `host_sync NAME` hands over to the host,
# which runs the guide's `<!-- test: host NAME -->` block against the target.
#
#   GUIDE_PART=single     discovery with CHAP, mutual CHAP login, the disk, ext4 + fstrim,
#                         growing the LUN (host), rescan + resize2fs, logout
#   GUIDE_PART=multipath  (harness --multipath, two ports) discovery, CHAP, login through both
#                         portals, multipath.conf, I/O through the map, a path down and back
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
. "$FILES_DIR/guide-steps.sh" || { echo "guide-steps.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
read -r -a portals <<<"$TARGET_HOST_PORTALS"
# The names the guide asks the reader to set (the guest reaches the target's own addresses
# through the harness's loopback alias).
PORTAL=${portals[0]}
PORTAL2=${portals[1]:-}
TARGET=$TARGET_IQN
part=${GUIDE_PART:-single}

# guide NAME: run the guide's block NAME in this shell; its first failing command ends the run.
guide() {
  step "guide block '$1'  [t=$(t)s]"
  set -E
  trap 'echo "FAIL: guide block '"$1"': \`$BASH_COMMAND\` exited with status $?"; FIRST_FAILURE="guide block '"$1"'"; FAILS=$((FAILS + 1)); summary' ERR
  set -e
  "guide_${1//-/_}"
  set +e
  trap - ERR
  set +E
}

# expect TEXT CONDITION...: count a failure named TEXT unless the condition holds.
expect() {
  local what=$1
  shift
  if "$@"; then echo "ok: $what"; else fail "$what"; fi
}

gib() { echo $(($(blockdev --getsize64 "$1") >> 30)); }

klog0=$(dmesg_lines)
echo "guest kernel $(uname -r), $(iscsiadm --version); target $TARGET at $PORTAL ${PORTAL2:+and $PORTAL2}"

guide name
guide discover
expect "discovery lists $TARGET at $PORTAL" \
  grep -q "$TARGET" <(iscsiadm -m node -T "$TARGET" -p "$PORTAL" 2>/dev/null)
guide chap

if [[ $part == single ]]; then
  guide login
  expect "mutual CHAP session is logged in" test "$(iscsiadm -m session | grep -c "$TARGET")" = 1
  guide disk
  expect "$DISK is a block device" test -b "$DISK"
  read -r gran dmax < <(lsblk -b -n -d -o DISC-GRAN,DISC-MAX "$DISK")
  expect "discard granularity 4 KiB (got $gran)" test "$gran" = 4096
  expect "discard maximum 512 MiB (got $dmax)" test "$dmax" = $((512 << 20))
  expect "the disk has 4 GiB (got $(gib "$DISK"))" test "$(gib "$DISK")" = 4
  out=$(guide filesystem 2>&1) || { echo "$out"; die "guide block 'filesystem' failed"; }
  echo "$out"
  trimmed=$(sed -n 's/.*(\([0-9]*\) bytes) trimmed.*/\1/p' <<<"$out" | tail -1)
  expect "fstrim trimmed at least 64 MiB (got ${trimmed:-nothing})" \
    test "${trimmed:-0}" -ge $((64 << 20))
  mountpoint -q /mnt/pytarget || die "the file system is not mounted"
  host_sync grow 120
  guide rescan
  expect "the disk has 6 GiB after the rescan (got $(gib "$DISK"))" test "$(gib "$DISK")" = 6
  size=$(df -B1G --output=size /mnt/pytarget | tail -1 | tr -d ' ')
  expect "the file system grew past 5 GiB (got $size GiB)" test "$size" -ge 5
  klog_out=$(dmesg_lines)
  guide logout
else
  pgrep -x multipathd >/dev/null || die "multipathd is not running (harness --multipath)"
  [[ -n $PORTAL2 ]] || die "the multipath part needs two portals"
  guide mp-login
  expect "one session per portal" test "$(iscsiadm -m session | grep -c "$TARGET")" = 2
  end=$((SECONDS + 30))
  while (($(iscsi_devices | awk '$3 == 0 && $4 != "-"' | wc -l) < 2)) && ((SECONDS < end)); do
    sleep 0.2
  done
  udevadm settle
  guide mp-conf
  guide mp-io
  expect "$MAP is a multipath map with 2 paths" \
    test "$(multipathd show maps raw format '%n %N' | awk -v m="${MAP#/dev/mapper/}" '$1 == m { print $2 }')" = 2
  guide mp-failover
  expect "the map still has its file system" test -s /mnt/pytarget/data
  end=$((SECONDS + 20))
  while [[ $(multipathd show maps raw format '%n %N' | awk -v m="${MAP#/dev/mapper/}" '$1 == m { print $2 }') != 2 ]] \
      && ((SECONDS < end)); do
    sleep 0.5
  done
  run multipath -ll
  klog_out=$(dmesg_lines)
  guide mp-logout
fi

step "kernel log  [t=$(t)s]"
# What the guide itself causes is expected: the capacity change it asks for, and the path
# failover of the multipath part.
# Once the logout has begun, a read the page cache still had queued (udev's probe after the
# unmount) fails on the vanishing disk: the kernel's teardown, not the target.
teardown='Buffer I/O error on dev sd[a-z]+, logical block [0-9]+, async page read'
errs=$( { kernel_errors "$klog0" "$klog_out"; kernel_errors "$klog_out" | grep -Ev "$teardown"; } \
  | grep -Ev 'Capacity data has changed|Unit Attention|Sense Key : Unit Attention|ASC=0x2a ASCQ=0x9|detected capacity change|tur checker reports path is down|remaining active paths|Failing path|fail path|reinstating path' || true)
report_kernel_errors "$errs"
summary
