#!/bin/bash
# snapshot.sh - snapshots of a LUN taken while the Linux guest writes to a file system on it,
# seen from a second login, and the backup flow that reads them.
#
#   linux-initiator run -p PORT -t IQN -e HOST_SYNC=1 -f tests/interop/guest/common.sh \
#       tests/interop/guest/snapshot.sh
#
# Needs one disk LUN (>= 48 MiB) and a host that answers the marks (tests/interop/run.py):
#   1. login (iface default), mkfs.ext4, mount; KEEP_FILES files of 1 MiB written, synced and
#      checksummed; fio starts in the background: 4 KiB random O_DIRECT writes (libaio, 8 in
#      flight) with crc32c verify headers, at most FIO_IOPS a second, so that it still writes
#      when snapshot A is taken
#   2. [host_sync snap-a] the host takes snapshot A of the LUN while fio writes, shows it as
#      LUN 1 and over NBD, and copies A's export (the full backup)
#   3. one kept file is overwritten in place (the blocks only snapshot A keeps from now on)
#   4. a second login (iface bk, initiator name ...-bk) sees LUN 1: its WRITE PROTECT bit is set,
#      it mounts read-only without journal replay (ext4 noload) and the kept files read back
#      with their checksums (fio's file is left alone there: its inode may be in the journal
#      only, and ext4 would log an error for it); a copy of it in RAM (read as RANGE_PARTS parallel streams) has
#      its journal replayed (what mounting a crashed file system does) and `e2fsck -f -n`
#      finds it clean (exit status 0); the second session logs out
#   5. [host_sync snap-b] the host takes snapshot B (fio usually still writes; it has written
#      since A in any case) and checks the full backup
#   6. fio ends and its verify pass must succeed; umount, e2fsck of the LUN, logout
# The kernel log must show that the first session got REPORTED LUNS DATA HAS CHANGED when LUN 1
# appeared, and no I/O, connection or reset errors.
# Environment: KEEP_FILES (6), FIO_MB (8), FIO_IOPS (100), HOST_SYNC (1).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
keep=${KEEP_FILES:-6} fio_mb=${FIO_MB:-8} fio_iops=${FIO_IOPS:-100}
mnt=/mnt/live snapmnt=/mnt/snap
mkdir -p "$mnt" "$snapmnt"
klog0=$(dmesg_lines)

step "1. login, ext4 on LUN 0, kept files, fio  [t=$(t)s]"
login_and_wait 1 || die "login failed"
sd=$(lun_sd 0) hctl=$(hctl_of 0)
[[ -n $sd ]] || die "LUN 0 did not appear"
echo "LUN 0 = $sd ($(($(blockdev --getsize64 "$sd") >> 20)) MiB)"
check "mkfs.ext4 $sd" mkfs.ext4 -F -q -E nodiscard -L pyt-snap "$sd" || die "mkfs.ext4 failed"
check "mount $sd" mount "$sd" "$mnt" || die "mount failed"
mkdir -p "$mnt/keep"
for ((i = 0; i < keep; i++)); do
  dd if=/dev/urandom of="$mnt/keep/k$i" bs=1M count=1 status=none || fail "writing keep/k$i"
done
(cd "$mnt" && sha256sum keep/k*) >/tmp/keep.sums
check "sync" sync
fio_runtime_s=$(((fio_mb * 256 + fio_iops - 1) / fio_iops))
echo "\$ fio randwrite ${fio_mb} MiB, 4 KiB O_DIRECT QD8, at most $fio_iops IOPS (>= ${fio_runtime_s}s), verify crc32c"
fio --name=snapwrite --directory="$mnt" --filename=fio.dat --size="${fio_mb}M" \
    --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 --rate_iops="$fio_iops" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out >/dev/null 2>&1 &
fio_pid=$!
# fio lays its file out first: once it has its full size, the random writes are under way
end=$((SECONDS + 120))
while [[ $(stat -c %s "$mnt/fio.dat" 2>/dev/null || echo 0) -lt $((fio_mb << 20)) ]]; do
  kill -0 "$fio_pid" 2>/dev/null || break
  ((SECONDS < end)) || die "fio did not lay out its file within 120s"
  sleep 0.2
done
kill -0 "$fio_pid" 2>/dev/null || die "fio ended before the first snapshot: $(tail -5 /tmp/fio.out)"
echo "fio is writing  [t=$(t)s]"

# still_writing MARK: whether fio was still running when the host acknowledged MARK
still_writing() {
  kill -0 "$fio_pid" 2>/dev/null && echo "fio was still writing when the host took snapshot $1"
}

step "2. host: snapshot A while fio writes  [t=$(t)s]"
host_sync snap-a 240 || die "the host did not take snapshot A"
still_writing A || die "fio had ended before the host took snapshot A (raise FIO_MB)"

step "3. overwrite keep/k0 in place (the old blocks are snapshot A's alone now)  [t=$(t)s]"
check "overwrite keep/k0" dd if=/dev/urandom of="$mnt/keep/k0" bs=1M count=1 conv=notrunc \
  oflag=direct status=none

step "4. second login (iface bk): snapshot A as LUN 1  [t=$(t)s]"
check "iscsiadm iface bk" iscsiadm -m iface -I bk -o new >/dev/null
check "iscsiadm iface bk initiatorname" \
  iscsiadm -m iface -I bk -o update -n iface.initiatorname -v "${INITIATOR_IQN}-bk" >/dev/null
check "discovery through bk" iscsiadm -m discovery -t sendtargets -p "$TARGET_PORTAL" -I default -I bk \
  >/dev/null || die "discovery through iface bk failed"
check "login through bk" iscsiadm -m node -T "$TARGET_IQN" -I bk --login \
  || die "second login failed"
snap_sd=
end=$((SECONDS + 30))
while ((SECONDS < end)); do
  snap_sd=$(iscsi_devices | awk '$1 == 1 && $3 == 0 && $4 != "-" && $7 == "bk" { print "/dev/" $4; exit }')
  [[ -n $snap_sd && -b $snap_sd ]] && break
  sleep 0.2
done
udevadm settle --timeout=10 2>/dev/null
iscsi_devices | sed 's/^/  /'
[[ -n $snap_sd ]] || die "LUN 1 (snapshot A) did not appear on the second session"
snap_sg=$(iscsi_devices | awk '$1 == 1 && $7 == "bk" { print "/dev/" $5; exit }')
echo "snapshot A = LUN 1 = $snap_sd ($snap_sg) through iface bk"
if [[ $(cat "/sys/block/${snap_sd#/dev/}/ro") == 1 ]]; then
  echo "the kernel sees $snap_sd as write protected (MODE SENSE WP)"
else
  fail "$snap_sd is not read-only to the kernel (no WP in MODE SENSE?)"
fi
check "mount snapshot A read-only (noload)" mount -o ro,noload "$snap_sd" "$snapmnt" \
  || die "the snapshot does not mount"
if (cd "$snapmnt" && sha256sum --quiet -c /tmp/keep.sums); then
  echo "the $keep kept files read back from snapshot A with their checksums"
else
  fail "kept files differ in snapshot A"
fi
if cmp -s "$snapmnt/keep/k0" "$mnt/keep/k0"; then
  fail "keep/k0 in snapshot A has the data written after the snapshot"
fi
ls -l "$snapmnt/keep" | sed 's/^/  /'
check "umount snapshot A" umount "$snapmnt"
t0=$(t)
snap_mb=$(($(blockdev --getsize64 "$snap_sd") >> 20))
per=$(((snap_mb + RANGE_PARTS - 1) / RANGE_PARTS)) rc=0
echo "\$ dd if=$snap_sd of=/tmp/snap-a.img bs=1M iflag=direct   # as $RANGE_PARTS parallel streams"
for ((i = 0; i < RANGE_PARTS; i++)); do
  dd if="$snap_sd" of=/tmp/snap-a.img bs=1M skip=$((i * per)) seek=$((i * per)) count="$per" \
     iflag=direct conv=notrunc status=none &
done
for ((i = 0; i < RANGE_PARTS; i++)); do wait -n || rc=$?; done
((rc == 0)) || die "reading snapshot A failed (dd exit status $rc)"
echo "read $snap_mb MiB of snapshot A in $(secs_since "$t0")s"
echo "\$ e2fsck -E journal_only /tmp/snap-a.img   # the journal replay a crashed fs gets"
rc=0; e2fsck -E journal_only -y /tmp/snap-a.img 2>&1 || rc=$?
((rc <= 1)) || fail "journal replay of snapshot A (e2fsck exit status $rc)"
check "e2fsck -f -n snapshot A reports problems" e2fsck -f -n /tmp/snap-a.img
rm -f /tmp/snap-a.img
check "logout bk" iscsiadm -m node -T "$TARGET_IQN" -I bk --logout

step "5. host: snapshot B, the backup of A checked  [t=$(t)s]"
host_sync snap-b 240 || die "the host did not take snapshot B"
still_writing B || echo "fio had ended before snapshot B (it wrote between A and B)"

step "6. fio ends, its verify pass  [t=$(t)s]"
rc=0; wait "$fio_pid" || rc=$?
grep -E 'err=|WRITE:|READ:|verify' /tmp/fio.out | sed 's/^/  /'
((rc == 0)) || { cat /tmp/fio.out; fail "fio with verify (exit status $rc)"; }
grep -v ' keep/k0$' /tmp/keep.sums >/tmp/keep.rest
if (cd "$mnt" && sha256sum --quiet -c /tmp/keep.rest); then
  echo "the kept files other than k0 are unchanged on the LUN"
else
  fail "kept files other than k0 changed on the LUN"
fi
check "umount $sd" umount "$mnt"
check "e2fsck -f -n $sd reports problems" e2fsck -f -n "$sd"
logout_and_wait

step "kernel log  [t=$(t)s]"
# REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh) reached the first session when LUN 1 appeared
if dmesg | sed -n "$((klog0 + 1)),\$p" | grep -q "sd $hctl: LUN assignments on this target have changed"; then
  echo "session 1 was told: REPORTED LUNS DATA HAS CHANGED (LUN assignments on this target have changed)"
else
  fail "session 1 never got REPORTED LUNS DATA HAS CHANGED when snapshot A appeared as LUN 1"
fi
report_kernel_errors "$(kernel_errors "$klog0")"
summary
