#!/bin/bash
# unmap.sh - logical block provisioning through the Linux initiator.
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/unmap.sh
#
# Needs two thin disk LUNs: the first (>= 256 MiB) carries an ext4 file system, the second
# takes raw SCSI commands (kept apart so that a failed UNMAP, which makes the kernel turn
# discard off for that disk, cannot spoil the fstrim part).
#   1. capabilities: VPD B2h has LBPU and LBPWS; READ CAPACITY(16) has LBPME; the kernel
#      chose provisioning_mode "unmap" and `lsblk -D` shows the discard granularity and
#      maximum that VPD B0h implies:
#        DISC-GRAN = max(physical block size, OPTIMAL UNMAP GRANULARITY x block size)
#        DISC-MAX  = min(MAXIMUM UNMAP LBA COUNT, 0x7fffff) x block size   (sd's SD_LBP_UNMAP)
#   2. sg_unmap of freshly written data: reads back as zeros (LBPRZ), GET LBA STATUS says
#      deallocated there and mapped where data stays
#   3. WRITE SAME(16) with UNMAP: zeros; WRITE SAME(16) of a pattern: every block holds it
#   4. blkdiscard through the block layer: zeros
#   5. ext4 on the first LUN: mkfs (nodiscard), fstrim, write UNMAP_MB MiB of files, sync,
#      fstrim (baseline: nothing is free that was not trimmed already), [host_sync written],
#      delete, sync, fstrim -v (must report at least UNMAP_MB MiB), umount, fsck.
#      With HOST_SYNC=1 the host records the first LUN's backing file allocation at the
#      "written" mark and again after the run; the difference is what the trim gave back.
# Environment: UNMAP_MB (100), HOST_SYNC (0).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
fs_mb=${UNMAP_MB:-100}
mnt=/mnt/pytarget
mkdir -p "$mnt"

login_and_wait 2
read -r -a luns <<<"$(disk_luns)"
sd_fs=$(lun_sd "${luns[0]}") sg_fs=$(lun_sg "${luns[0]}")
sd=$(lun_sd "${luns[1]}") sg=$(lun_sg "${luns[1]}") hctl=$(hctl_of "${luns[1]}")
bs=$(block_size "$sg"); bs=${bs:-512}
mib=$((1048576 / bs))                        # blocks per MiB
echo "raw LUN ${luns[1]}: $sd $sg ($hctl), block size $bs; file system LUN ${luns[0]}: $sd_fs"

# ------------------------------------------------------------------------ capabilities
step "1. provisioning capabilities of $sg  [t=$(t)s]"
run sg_vpd -p lbpv "$sg"
run sg_vpd -p bl "$sg"
run sg_readcap -l "$sg"
lbp=$(vpd_bytes lbpv "$sg") bl=$(vpd_bytes bl "$sg")
[[ -n $lbp ]] || fail "VPD page B2h (logical block provisioning) cannot be read"
[[ -n $bl ]] || fail "VPD page B0h (block limits) cannot be read"
flags=$(be "$lbp" 5 1)
lbpu=$(((flags >> 7) & 1)) lbpws=$(((flags >> 6) & 1)) lbpws10=$(((flags >> 5) & 1)) lbprz=$(((flags >> 2) & 7))
echo "VPD B2h: LBPU=$lbpu LBPWS=$lbpws LBPWS10=$lbpws10 LBPRZ=$lbprz provisioning type=$(($(be "$lbp" 6 1) & 7))"
((lbpu == 1)) || fail "VPD B2h: LBPU is 0 (UNMAP not advertised)"
((lbpws == 1)) || fail "VPD B2h: LBPWS is 0 (WRITE SAME(16) with UNMAP not advertised)"
mulc=$(be "$bl" 20 4) mubdc=$(be "$bl" 24 4) oug=$(be "$bl" 28 4) uga=$(be "$bl" 32 4) mwsl=$(be "$bl" 36 8)
echo "VPD B0h: MAXIMUM UNMAP LBA COUNT=$mulc MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT=$mubdc" \
     "OPTIMAL UNMAP GRANULARITY=$oug UGAVALID=$((uga >> 31)) ALIGNMENT=$((uga & 0x7fffffff))" \
     "MAXIMUM WRITE SAME LENGTH=$mwsl"
((mulc > 0)) || fail "VPD B0h: MAXIMUM UNMAP LBA COUNT is 0 although LBPU=1"
((mubdc > 0)) || fail "VPD B0h: MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT is 0 although LBPU=1"
lbpme=$(sg_readcap -l "$sg" 2>/dev/null | sed -n 's/.*lbpme=\([01]\).*/\1/p')
echo "READ CAPACITY(16): lbpme=${lbpme:-?}"
[[ $lbpme == 1 ]] || fail "READ CAPACITY(16): LBPME is not set"

mode=$(cat /sys/class/scsi_disk/"$hctl"/provisioning_mode 2>/dev/null)
echo "kernel provisioning_mode: ${mode:-?}"
[[ $mode == unmap ]] || fail "kernel provisioning_mode is '${mode:-?}', expected unmap"
run lsblk -D "$sd" "$sd_fs"
read -r gran dmax dzero < <(lsblk -D -b -n -d -o DISC-GRAN,DISC-MAX,DISC-ZERO "$sd")
pbs=$(cat /sys/block/"${sd#/dev/}"/queue/physical_block_size)
want_gran=$((oug * bs > pbs ? oug * bs : pbs))
cap=$((mulc < 0x7fffff ? mulc : 0x7fffff))
want_max=$((cap * bs))
echo "lsblk -D: DISC-GRAN=$gran (expected $want_gran) DISC-MAX=$dmax (expected $want_max) DISC-ZERO=$dzero"
[[ $gran == "$want_gran" ]] || fail "DISC-GRAN $gran != max(physical block $pbs, $oug x $bs)"
[[ $dmax == "$want_max" ]] || fail "DISC-MAX $dmax != min($mulc, 0x7fffff) x $bs"

# ------------------------------------------------------------------------ UNMAP
# Whole ranges move in one O_DIRECT request each (dd with byte offsets): 512-byte dd blocks
# would cost one round trip through the emulated network per block.
readr() {   # readr LBA BLOCKS: the range's bytes on stdout
  dd if="$sd" bs=$(($2 * bs)) count=1 skip=$(($1 * bs)) iflag=direct,skip_bytes status=none
}
zeros() {   # zeros LBA BLOCKS: true when that range reads back as zeros
  cmp -s <(readr "$1" "$2") <(head -c $(($2 * bs)) /dev/zero)
}
fill() {    # fill LBA BLOCKS: write random data there and check it reads back
  head -c $(($2 * bs)) /dev/urandom >/tmp/fill.bin
  dd if=/tmp/fill.bin of="$sd" bs=$(($2 * bs)) count=1 seek=$(($1 * bs)) \
     oflag=direct,seek_bytes conv=fsync status=none \
    || { fail "writing $2 blocks at LBA $1"; return 1; }
  cmp -s /tmp/fill.bin <(readr "$1" "$2") || fail "data written at LBA $1 does not read back"
}
expect_zeros() {   # expect_zeros LBA BLOCKS WHAT
  if zeros "$1" "$2"; then echo "LBA $1 + $2 blocks reads back as zeros after $3"
  else fail "LBA $1 + $2 blocks does not read back as zeros after $3 (LBPRZ=$lbprz)"; fi
}
# lba_status LBA: "STATUS BLOCKS" of the first GET LBA STATUS descriptor, which SBC requires
# to start at LBA (provisioning status 0 = mapped, 1 = deallocated, 2 = anchored), or
# "error: ..." when the command fails or the descriptor starts elsewhere.
lba_status() {
  local out a b p
  out=$(sg_get_lba_status --brief --lba="$1" "$sg" 2>&1) || { echo "error: $(head -1 <<<"$out")"; return; }
  # --brief: "Completion condition=N", "RTP=N", then "LBA_HEX BLOCKS_HEX P_STATUS ADD_STATUS"
  read -r a b p _ <<<"$(grep -m1 '^0x' <<<"$out")"
  [[ -n $a ]] || { echo "error: no descriptor in: $(tr '\n' ' ' <<<"$out")"; return; }
  if [[ $((a)) != "$1" ]]; then echo "error: first descriptor starts at $a"; return; fi
  echo "$p $((b))"
}
expect_status() {   # expect_status LBA BLOCKS STATUS WHAT
  local got p n
  got=$(lba_status "$1")
  echo "\$ sg_get_lba_status --brief --lba=$1 $sg   -> $got"
  read -r p n _ <<<"$got"
  if [[ $p == "$3" && $n =~ ^[0-9]+$ ]] && ((n >= $2)); then
    echo "GET LBA STATUS at $1: status $p for $n blocks ($4)"
  else
    fail "GET LBA STATUS at LBA $1: got '$got', expected status $3 for >= $2 blocks ($4)"
  fi
}

lba=$((8 * mib)) num=$mib
step "2. UNMAP (sg_unmap) of 1 MiB written just before: LBA $lba + $num  [t=$(t)s]"
fill "$lba" "$num"
fill $((lba + num)) "$num"
expect_status "$lba" "$num" 0 "written, must be mapped"
check "sg_unmap" sg_unmap --force --lba="$lba" --num="$num" "$sg"
expect_zeros "$lba" "$num" "UNMAP"
expect_status "$lba" "$num" 1 "unmapped, must be deallocated"
expect_status $((lba + num)) "$num" 0 "the next MiB was not unmapped, must stay mapped"
if zeros $((lba + num)) "$num"; then fail "the MiB after the unmapped range was zeroed too"
else echo "the MiB after the unmapped range kept its data"; fi
expect_status $((32 * mib)) "$num" 1 "never written, must be deallocated"

l2=$((16 * mib))
step "3. WRITE SAME(16): UNMAP bit, then a pattern: LBA $l2 + $num  [t=$(t)s]"
fill "$l2" "$num"
check "sg_write_same --16 --unmap" sg_write_same --16 --unmap --lba="$l2" --num="$num" "$sg"
expect_zeros "$l2" "$num" "WRITE SAME(16) with UNMAP"
head -c "$bs" /dev/urandom >/tmp/pattern.bin
check "sg_write_same --16 (pattern)" sg_write_same --16 --in=/tmp/pattern.bin --lba="$l2" --num=64 "$sg"
for ((i = 0; i < 64; i++)); do cat /tmp/pattern.bin; done >/tmp/pattern64.bin
if cmp -s /tmp/pattern64.bin <(readr "$l2" 64); then
  echo "all 64 blocks at LBA $l2 hold the WRITE SAME pattern"
else fail "the 64 blocks at LBA $l2 do not all hold the WRITE SAME pattern"; fi

l3=$((20 * mib))
step "4. blkdiscard through the block layer: LBA $l3 + $num  [t=$(t)s]"
fill "$l3" "$num"
check "blkdiscard" blkdiscard -v -o $((l3 * bs)) -l $((num * bs)) "$sd"
expect_zeros "$l3" "$num" "blkdiscard"

# ------------------------------------------------------------------------ ext4 + fstrim
# fstrim_v: fstrim -v the mount point; TRIMMED = the bytes it reports trimmed.
fstrim_v() {
  local out rc=0
  echo "\$ fstrim -v $mnt"
  out=$(fstrim -v "$mnt" 2>&1) || rc=$?
  echo "$out"
  TRIMMED=$(sed -n 's/.*(\([0-9]*\) bytes) trimmed.*/\1/p' <<<"$out" | head -1)
  ((rc == 0)) || fail "fstrim -v $mnt (exit status $rc)"
  TRIMMED=${TRIMMED:-0}
}

step "5. ext4 on $sd_fs: mkfs, baseline fstrim, write $fs_mb MiB  [t=$(t)s]"
check "mkfs.ext4 $sd_fs" mkfs.ext4 -F -q -E nodiscard "$sd_fs" || die "mkfs.ext4 failed"
check "mount $sd_fs" mount "$sd_fs" "$mnt" || die "mount failed"
fstrim_v
echo "fstrim after mkfs trimmed $TRIMMED bytes"
for ((i = 0; i < fs_mb / 4; i++)); do
  dd if=/dev/urandom of="$mnt/f$i" bs=1M count=4 iflag=fullblock status=none || fail "writing $mnt/f$i"
done
check "sync after writing" sync
run df -h "$mnt"
fstrim_v
echo "baseline fstrim with the files in place trimmed $TRIMMED bytes"
echo "UNMAP-MARK written $((fs_mb / 4 * 4)) MiB"
host_sync written

step "5. ext4: delete the files, sync, fstrim  [t=$(t)s]"
rm -f "$mnt"/f*
check "sync after deleting" sync
fstrim_v
echo "UNMAP-MARK trimmed $TRIMMED bytes after delete"
if ((TRIMMED >= fs_mb * 1048576)); then echo "fstrim gave back at least $fs_mb MiB"
else fail "fstrim after deleting $fs_mb MiB reported $TRIMMED bytes trimmed"; fi
check "umount" umount "$mnt"
check "fsck.ext4 -f -n $sd_fs reports problems" fsck.ext4 -f -n "$sd_fs"

step "logout  [t=$(t)s]"
logout_and_wait
summary
