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
alua_devices 12 >>/etc/multipath.conf
check "multipathd reconfigure" multipathd reconfigure

step "discovery through each gateway, one login each (${portals[*]})"
discover_each
login_each
run iscsiadm -m session
two_paths
iscsi_devices

step "ALUA states: gateway 1 owns LUN 0"
expect_states active/optimized active/non-optimized
run sg_rtpg -d "/dev/$sd2"
map=$(multipathd show paths raw format '%d %m' 2>/dev/null | awk -v d="$sd1" '$1 == d { print $2; exit }')
[[ -n $map && -b /dev/mapper/$map ]] || die "no multipath map for LUN 0"
expect_groups "$sd1" "$sd2"

map_io() {   # write 4 MiB through the map, read back, compare
  dd if=/dev/urandom of=/tmp/pat bs=1M count=4 status=none
  check "write through the map" dd if=/tmp/pat of="/dev/mapper/$map" bs=1M count=4 oflag=direct conv=fsync status=none
  check "read through the map" dd if="/dev/mapper/$map" of=/tmp/back bs=1M count=4 iflag=direct status=none
  check "data read back" cmp /tmp/pat /tmp/back
}
step "I/O through the map"
before=$(dmesg_lines)
map_io

step "the host moves LUN 0 to gateway 2"
host_sync move 120
expect_states active/non-optimized active/optimized
run sg_rtpg -d "/dev/$sd1"
expect_groups "$sd2" "$sd1"
step "I/O through the map after the move"
map_io
trouble=$(kernel_errors "$before")
[[ -z $trouble ]] || { echo "$trouble"; fail "kernel reported errors on the iSCSI path"; }

step "cleanup"
flush_map "$map"
check "map $map removed" bash -c "! multipath -ll \"$map\" 2>/dev/null | grep -q ."
check "logout" iscsiadm -m node -T "$TARGET_IQN" --logout
summary
