#!/bin/bash
# gateways_failover.sh - the owning gateway of an RBD LUN killed under a filesystem in use
# (docs/guides/scale-out.md, "When a gateway dies"). dm-multipath over two gateways: the
# owner's path is active/optimized, the other active/non-optimized. ext4 on the map; fio
# writes a file with verification headers at a fixed rate; while it writes, the host kills the
# owning gateway with SIGKILL (host_sync kill). The session to it fails after
# replacement_timeout, dm-multipath retries on the survivor, which has fenced the dead gateway
# and taken the LUN over: fio finishes, its verification passes, no I/O error reaches the
# filesystem, fsck is clean. The longest I/O (the stall) is printed from fio's latency log.
# Then the host starts the gateway again (host_sync restart) and its path comes back,
# active/non-optimized.
#   linux-initiator run --multipath -p PORT_GW1 -p PORT_GW2 -t IQN gateways_failover.sh
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh"
: "${TARGET_IQN:?pass the target IQN with -t}"
read -r -a portals <<<"$TARGET_HOST_PORTALS"
((${#portals[@]} == 2)) || die "give the two gateways' ports (-p P1 -p P2)"
pgrep -x multipathd >/dev/null || die "multipathd is not running (use --multipath)"
REPLACEMENT_TIMEOUT=${REPLACEMENT_TIMEOUT:-6}
FIO_SIZE=${FIO_SIZE:-64M}
FIO_RATE=${FIO_RATE:-16m}
KILL_AFTER=${KILL_AFTER:-3}

step "multipath.conf: ALUA priorities, paths grouped by priority, I/O queued without paths"
{
  printf 'defaults {\n    user_friendly_names yes\n    find_multipaths no\n    polling_interval 2\n}\n'
  alua_devices queue
} >/etc/multipath.conf
check "multipathd reconfigure" multipathd reconfigure

step "discovery and login through each gateway (replacement_timeout $REPLACEMENT_TIMEOUT s)"
discover_each
check "replacement_timeout" iscsiadm -m node -T "$TARGET_IQN" -o update \
  -n node.session.timeo.replacement_timeout -v "$REPLACEMENT_TIMEOUT"
login_each
two_paths

step "ALUA states: gateway 1 owns LUN 0"
expect_states active/optimized active/non-optimized
map=$(multipathd show paths raw format '%d %m' 2>/dev/null | awk -v d="$sd1" '$1 == d { print $2; exit }')
[[ -n $map && -b /dev/mapper/$map ]] || die "no multipath map for LUN 0"
expect_groups "$sd1" "$sd2"

step "ext4 on the map"
check "mkfs.ext4" mkfs.ext4 -q -F "/dev/mapper/$map" || die "mkfs failed"
mkdir -p /mnt/failover
check "mount" mount "/dev/mapper/$map" /mnt/failover || die "mount failed"
before=$(dmesg_lines)

step "fio writes $FIO_SIZE with verification headers at $FIO_RATE/s; gateway 1 is killed meanwhile"
fio --name=failover --filename=/mnt/failover/data --size="$FIO_SIZE" --rw=write --bs=256k \
    --direct=1 --ioengine=libaio --iodepth=8 --rate="$FIO_RATE" --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --write_lat_log=/tmp/failover --log_avg_msec=0 \
    --output=/tmp/fio.out &
fio_pid=$!
started=$(t)
sleep "$KILL_AFTER"
host_sync kill 60
killed=$(t)
echo "gateway 1 killed at t=$(secs_since "$started")s into fio"
fio_rc=0
wait "$fio_pid" || fio_rc=$?
echo "fio ended $(secs_since "$killed")s after the kill, exit status $fio_rc"
cat /tmp/fio.out
((fio_rc == 0)) || fail "fio failed (exit status $fio_rc)"
grep -qi 'verify:.*bad\|verify failed\|crc32c: verify' /tmp/fio.out && fail "fio reports verification errors"

step "the stall: the longest I/O and the longest gap between completions (fio's latency log)"
log=$(ls /tmp/failover_clat.*.log 2>/dev/null | head -n 1)
if [[ -s $log ]]; then
  awk -F', *' '
    { if ($2 > max) { max = $2; at = $1; dir = $3 } }
    NR > 1 && $1 - prev > gap { gap = $1 - prev; gap_at = prev }
    { prev = $1; n++ }
    END {
      printf "I/Os logged: %d\n", n
      printf "MAX I/O STALL: %.2f s (a %s completing at %.1f s into fio)\n", max / 1e9, dir == 1 ? "write" : "read", at / 1000
      printf "MAX COMPLETION GAP: %.2f s (from %.1f s into fio)\n", gap / 1000, gap_at / 1000
    }' "$log" | tee "$OUT_DIR/stall.txt"
else
  fail "no latency log from fio"
fi

step "what reached the filesystem"
errors=$(dmesg | sed -n "$((before + 1)),\$p")
fs_errors=$(grep -E 'EXT4-fs (error|warning)|Buffer I/O error|I/O error, dev dm-|error, dev dm-|journal .*abort' <<<"$errors" || true)
echo "--- kernel messages on the path to gateway 1 (expected: its session failed)"
grep -E "session|connection|$sd1\b" <<<"$errors" | tail -n 15 || true
if [[ -n $fs_errors ]]; then
  echo "$fs_errors"
  fail "an I/O error reached the multipath device or the filesystem"
else
  echo "no I/O error on the multipath device or in ext4"
fi
check "umount" umount /mnt/failover
check "fsck.ext4 -fn: clean" fsck.ext4 -fn "/dev/mapper/$map"

step "gateway 2 owns LUN 0 now"
end=$((SECONDS + 30))
until [[ $(alua_state "$sd2") == active/optimized ]] || ((SECONDS >= end)); do
  sg_turs "/dev/$sd2" >/dev/null 2>&1
  sleep 0.5
done
echo "access_state: $sd2 (gateway 2) $(alua_state "$sd2")"
[[ $(alua_state "$sd2") == active/optimized ]] \
  || fail "$sd2 through gateway 2 is $(alua_state "$sd2"), not active/optimized"
run sg_rtpg -d "/dev/$sd2"
printf '$ multipath -ll\n%s\n' "$(multipath -ll 2>/dev/null)"

step "gateway 1 starts again and rejoins, active/non-optimized"
session1=$(iscsi_devices | awk -v d="$sd1" '$4 == d { print $6; exit }')
host_sync restart 90
end=$((SECONDS + 30))   # iscsid logs in again by itself: the session was in recovery
until [[ $(cat "/sys/class/iscsi_session/$session1/state" 2>/dev/null) == LOGGED_IN ]] \
    || ((SECONDS >= end)); do
  sleep 0.5
done
state1=$(cat "/sys/class/iscsi_session/$session1/state" 2>/dev/null)
echo "session to gateway 1 ($session1): $state1"
if [[ $state1 != LOGGED_IN ]]; then
  # Seen once in three runs: iscsid kept reconnecting without sending a login. What an
  # operator does then: log that path out and in again (a new session, a new sd device).
  echo "iscsid did not log in to gateway 1 again by itself; logging that path in again"
  run iscsiadm -m node -T "$TARGET_IQN" -p "${portals[0]}" --logout
  check "login through ${portals[0]} again" iscsiadm -m node -T "$TARGET_IQN" -p "${portals[0]}" --login
  end=$((SECONDS + 30))
  until sd1=$(lun0_via "${portals[0]##*:}") && [[ -n $sd1 ]] || ((SECONDS >= end)); do sleep 0.5; done
  udevadm settle
  echo "LUN 0 through gateway 1 is now $sd1"
  [[ -n $sd1 ]] || die "no path through gateway 1 after logging in again"
fi
expect_states active/non-optimized active/optimized 30
check "multipathd reconfigure (priorities and groups read again)" multipathd reconfigure
expect_groups "$sd2" "$sd1" 60
run sg_rtpg -d "/dev/$sd1"

step "cleanup"
flush_map "$map"
check "logout" iscsiadm -m node -T "$TARGET_IQN" --logout
summary
