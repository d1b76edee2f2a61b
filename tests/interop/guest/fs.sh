#!/bin/bash
# fs.sh - pytarget acceptance with the Linux initiator: ext4 on iSCSI LUNs, first over a
# session without digests, then over one with CRC32C header and data digests.
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/fs.sh
#
# Needs two disk LUNs: the first (>= 300 MiB) gets FS_FILES x FS_FILE_MB MiB of random
# files, the second (>= 64 MiB) a smaller round under digests.
#   round 1, HeaderDigest=None DataDigest=None: SendTargets discovery, login, mkfs.ext4 on
#     LUN A, mount, write + sha256 the files, umount, drop caches, mount, verify, umount,
#     fsck -f -n, logout
#   round 2, HeaderDigest=CRC32C DataDigest=CRC32C (checked in `iscsiadm -m session -P 2`):
#     verify round 1's files on LUN A again (read through data digests), mkfs.ext4 on LUN B,
#     write + verify FS_DIGEST_FILES files across a remount, fsck both, logout
# Any checksum mismatch, failed command, fsck complaint or kernel I/O / connection / digest
# error makes the script exit 1.
# Environment: FS_FILES (50), FS_FILE_MB (4), FS_DIGEST_FILES (10).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
nfiles=${FS_FILES:-50} file_mb=${FS_FILE_MB:-4} dfiles=${FS_DIGEST_FILES:-10}
mnt=/mnt/pytarget
mkdir -p "$mnt"

# write_files DIR COUNT PREFIX SUMS: COUNT random files of file_mb MiB, checksums to SUMS.
write_files() {
  local dir=$1 count=$2 prefix=$3 sums=$4 i t0 t1
  mkdir -p "$dir"
  t0=$(t)
  for ((i = 0; i < count; i++)); do
    dd if=/dev/urandom of="$dir/$prefix$i" bs=1M count="$file_mb" iflag=fullblock status=none \
      || fail "writing $dir/$prefix$i"
  done
  (cd / && sha256sum "$dir/$prefix"*) >"$sums"
  check "sync after writing $dir" sync
  t1=$(t)
  echo "wrote $count x $file_mb MiB into $dir (+ sync) in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s"
}

# verify SUMS: re-read the files listed in SUMS and compare their checksums.
verify() {
  local n
  n=$(wc -l <"$1")
  if sha256sum --quiet -c "$1"; then
    echo "checksums of $n files: OK"
  else
    fail "checksum mismatch in files of $1"
  fi
}

remount_cold() {   # remount_cold DEV: umount, drop the page cache, mount again
  check "umount $1" umount "$mnt" || return 1
  echo 3 >/proc/sys/vm/drop_caches
  check "mount $1" mount "$1" "$mnt"
}

fsck_clean() {
  check "umount before fsck of $1" umount "$mnt" 2>/dev/null
  check "fsck.ext4 -f -n $1 reports problems" fsck.ext4 -f -n "$1"
}

set_digests() {
  local key
  for key in HeaderDigest DataDigest; do
    check "set $key=$1 in the node record" \
      iscsiadm -m node -T "$TARGET_IQN" -o update -n "node.conn[0].iscsi.$key" -v "$1"
  done
}

expect_digests() {
  local key got
  for key in HeaderDigest DataDigest; do
    got=$(session_param "$key")
    if [[ $got == "$1" ]]; then echo "negotiated $key: $got"
    else fail "negotiated $key is '${got:-?}', expected $1"; fi
  done
}

login_disks() {
  check "login" iscsiadm -m node -T "$TARGET_IQN" --login || die "login failed"
  wait_for_disks 2 30 || die "two disk LUNs did not appear after login"
  iscsi_devices | sed 's/^/  /'
  read -r -a luns <<<"$(disk_luns)"
  sd_a=$(lun_sd "${luns[0]}") sd_b=$(lun_sd "${luns[1]}")
  echo "LUN ${luns[0]} = $sd_a ($(($(blockdev --getsize64 "$sd_a") >> 20)) MiB)," \
       "LUN ${luns[1]} = $sd_b ($(($(blockdev --getsize64 "$sd_b") >> 20)) MiB)"
}

echo "guest kernel $(uname -r); target $TARGET_IQN at $TARGET_PORTAL (host $TARGET_HOST_PORTAL)"
klog0=$(dmesg_lines)

step "SendTargets discovery  [t=$(t)s]"
echo "\$ iscsiadm -m discovery -t sendtargets -p $TARGET_PORTAL"
disc=$(iscsiadm -m discovery -t sendtargets -p "$TARGET_PORTAL" 2>&1) || fail "discovery (exit status $?)"
echo "$disc"
grep -q " $TARGET_IQN\$" <<<"$disc" || die "discovery did not return $TARGET_IQN"

step "round 1: login without digests  [t=$(t)s]"
set_digests None
login_disks
expect_digests None

step "round 1: mkfs.ext4 on $sd_a, write $nfiles x $file_mb MiB  [t=$(t)s]"
# nodiscard: the acceptance run must not depend on UNMAP support
check "mkfs.ext4 $sd_a" mkfs.ext4 -F -q -E nodiscard -L pyt-a "$sd_a" || die "mkfs.ext4 failed"
check "mount $sd_a" mount "$sd_a" "$mnt" || die "mount failed"
write_files "$mnt/r1" "$nfiles" f /tmp/sums.r1
run df -h "$mnt"

step "round 1: remount cold and verify  [t=$(t)s]"
remount_cold "$sd_a" || die "remount failed"
verify /tmp/sums.r1
fsck_clean "$sd_a"

step "round 1: logout  [t=$(t)s]"
logout_and_wait || die "logout failed"

step "round 2: login with HeaderDigest=CRC32C DataDigest=CRC32C  [t=$(t)s]"
set_digests CRC32C
login_disks
run iscsiadm -m session -P 2
expect_digests CRC32C

step "round 2: re-read round 1's files on $sd_a through data digests  [t=$(t)s]"
check "mount $sd_a read-only" mount -o ro "$sd_a" "$mnt" && {
  verify /tmp/sums.r1
  check "umount $sd_a" umount "$mnt"
}

step "round 2: mkfs.ext4 on $sd_b, write $dfiles x $file_mb MiB  [t=$(t)s]"
check "mkfs.ext4 $sd_b" mkfs.ext4 -F -q -E nodiscard -L pyt-b "$sd_b" || die "mkfs.ext4 failed"
check "mount $sd_b" mount "$sd_b" "$mnt" || die "mount failed"
write_files "$mnt/r2" "$dfiles" g /tmp/sums.r2
remount_cold "$sd_b" || die "remount failed"
verify /tmp/sums.r2
fsck_clean "$sd_b"
check "fsck.ext4 -f -n $sd_a reports problems" fsck.ext4 -f -n "$sd_a"

step "round 2: logout  [t=$(t)s]"
logout_and_wait

step "kernel log  [t=$(t)s]"
report_kernel_errors "$(kernel_errors "$klog0")"
summary
