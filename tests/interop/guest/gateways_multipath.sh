#!/bin/bash
# gateways_multipath.sh - dm-multipath over two pytarget gateways of one target (implicit ALUA,
# docs/guides/scale-out.md). One session per gateway; multipathd groups the paths by ALUA
# priority: the path through the gateway that owns LUN 0 (the first port) is active/optimized
# in the active path group, the other active/non-optimized in an enabled group. I/O through the
# map is verified. Then the host moves LUN 0 to the second gateway (host_sync move: the
# configuration's owner changes and both gateways reload): each path's next command gets
# ASYMMETRIC ACCESS STATE CHANGED, the kernel re-reads the target port groups, and the states
# swap; I/O through the map is verified again.
#   linux-initiator run --multipath -p PORT_GW1 -p PORT_GW2 -t IQN gateways_multipath.sh
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh"
: "${TARGET_IQN:?pass the target IQN with -t}"
read -r -a portals <<<"$TARGET_HOST_PORTALS"
((${#portals[@]} == 2)) || die "give the two gateways' ports (-p P1 -p P2)"
pgrep -x multipathd >/dev/null || die "multipathd is not running (use --multipath)"

step "multipath.conf: ALUA priorities, paths grouped by priority"
cat >>/etc/multipath.conf <<'EOF'
devices {
    device {
        vendor "PYTARGET"
        product "pytarget disk"
        hardware_handler "1 alua"
        prio alua
        path_grouping_policy group_by_prio
        path_selector "service-time 0"
        failback immediate
        no_path_retry 12
    }
}
EOF
check "multipathd reconfigure" multipathd reconfigure

step "discovery through each gateway, one login each (${portals[*]})"
for p in "${portals[@]}"; do
  check "discovery through $p" iscsiadm -m discovery -t sendtargets -p "$p"
done
for p in "${portals[@]}"; do
  check "login through $p" iscsiadm -m node -T "$TARGET_IQN" -p "$p" --login
done
run iscsiadm -m session
end=$((SECONDS + 30))
while ((SECONDS < end)); do
  paths=$(iscsi_devices | awk '$1 == 0 && $3 == 0 && $4 != "-"' | wc -l)
  ((paths >= 2)) && break
  sleep 0.2
done
((paths >= 2)) || die "LUN 0 has $paths path(s), expected 2"
iscsi_devices
udevadm settle

# path_of PORT: the sd device of LUN 0 reached through the session to 127.0.0.1:PORT.
path_of() {
  local lun hctl type sd sg session iface port
  while read -r lun hctl type sd sg session iface; do
    [[ $lun == 0 && $sd != - ]] || continue
    port=$(cat /sys/class/iscsi_session/"$session"/device/connection*/iscsi_connection/*/persistent_port 2>/dev/null | head -n 1)
    [[ $port == "$1" ]] && { echo "$sd"; return; }
  done < <(iscsi_devices)
}
sd1=$(path_of "${portals[0]##*:}") sd2=$(path_of "${portals[1]##*:}")
echo "LUN 0: $sd1 through gateway 1, $sd2 through gateway 2"
[[ -n $sd1 && -n $sd2 ]] || die "cannot tell the two paths apart"

state() { cat "/sys/block/$1/device/access_state" 2>/dev/null; }

# expect_states STATE1 STATE2 [SECONDS]: wait for the kernel's ALUA states of the two paths.
expect_states() {
  local end=$((SECONDS + ${3:-30}))
  while ((SECONDS < end)); do
    [[ $(state "$sd1") == "$1" && $(state "$sd2") == "$2" ]] && break
    # a command on each path brings its unit attention and the re-read of the port groups
    sg_turs "/dev/$sd1" >/dev/null 2>&1; sg_turs "/dev/$sd2" >/dev/null 2>&1
    sleep 0.5
  done
  echo "access_state: $sd1 (gateway 1) $(state "$sd1"), $sd2 (gateway 2) $(state "$sd2")"
  [[ $(state "$sd1") == "$1" ]] || fail "$sd1 through gateway 1 is $(state "$sd1"), not $1"
  [[ $(state "$sd2") == "$2" ]] || fail "$sd2 through gateway 2 is $(state "$sd2"), not $2"
}

# expect_groups SD_ACTIVE SD_ENABLED: multipath -ll shows two path groups, SD_ACTIVE in the
# active one, SD_ENABLED in the enabled one.
expect_groups() {
  local out groups end=$((SECONDS + 30))
  while ((SECONDS < end)); do
    out=$(multipath -ll 2>/dev/null)
    groups=$(grep -c 'policy=' <<<"$out")
    ((groups == 2)) && grep -A1 'status=active' <<<"$out" | grep -q " $1 " && break
    sleep 0.5
  done
  printf '$ multipath -ll\n%s\n' "$out"
  ((groups == 2)) || fail "multipath -ll shows $groups path group(s), expected 2"
  grep -A1 'status=active' <<<"$out" | grep -q " $1 " \
    || fail "the active path group does not hold $1"
  grep -A1 'status=enabled' <<<"$out" | grep -q " $2 " \
    || fail "the enabled path group does not hold $2"
}

step "ALUA states: gateway 1 owns LUN 0"
expect_states active/optimized active/non-optimized
run sg_rtpg -d "/dev/$sd2"
map=$(multipathd show paths raw format '%d %m' 2>/dev/null | awk -v d="$sd1" '$1 == d { print $2; exit }')
[[ -n $map && -b /dev/mapper/$map ]] || die "no multipath map for LUN 0"
expect_groups "$sd1" "$sd2"

io() {   # write 4 MiB through the map, read back, compare
  dd if=/dev/urandom of=/tmp/pat bs=1M count=4 status=none
  check "write through the map" dd if=/tmp/pat of="/dev/mapper/$map" bs=1M count=4 oflag=direct conv=fsync status=none
  check "read through the map" dd if="/dev/mapper/$map" of=/tmp/back bs=1M count=4 iflag=direct status=none
  check "data read back" cmp /tmp/pat /tmp/back
}
step "I/O through the map"
before=$(dmesg_lines)
io

step "the host moves LUN 0 to gateway 2"
host_sync move 120
expect_states active/non-optimized active/optimized
run sg_rtpg -d "/dev/$sd1"
expect_groups "$sd2" "$sd1"
step "I/O through the map after the move"
io
trouble=$(kernel_errors "$before")
[[ -z $trouble ]] || { echo "$trouble"; fail "kernel reported errors on the iSCSI path"; }

step "cleanup"
udevadm settle
end=$((SECONDS + 20))   # udev or multipathd may still hold the map for a moment
until multipath -f "$map" 2>/dev/null || ((SECONDS >= end)); do sleep 0.5; done
check "map $map removed" bash -c "! multipath -ll \"$map\" 2>/dev/null | grep -q ."
check "logout" iscsiadm -m node -T "$TARGET_IQN" --logout
summary
