#!/bin/bash
# sanitize.sh - SANITIZE and WRITE ATOMIC(16) through the Linux initiator.
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/sanitize.sh
#
# LUN 0 (thin, paced by its sanitize_rate so an operation lasts a few seconds):
#   - sg_sanitize --overwrite with a pattern, waiting (IMMED=0): every block reads back as the
#     pattern (first and last MiB compared)
#   - sg_sanitize --overwrite --early (IMMED=1): sg_requests --progress reports a progress
#     indication while it runs, a READ meanwhile fails with SANITIZE IN PROGRESS, and polling
#     with sg_requests --progress --num ends when it is done; the blocks hold the new pattern
#   - sg_sanitize --block, waiting and --early: every block reads back as zeros and
#     sg_get_lba_status reports the LUN deallocated
#   - sg_sanitize --crypto is rejected (ILLEGAL REQUEST): a file has no key
# LUN 1 (its backing file on XFS, where the target has RWF_ATOMIC):
#   - VPD B0h advertises one atomic length (granularity = alignment = maximum)
#   - sg_raw WRITE ATOMIC(16) of that length at an aligned LBA succeeds and reads back
#   - twice the length, or a misaligned LBA, is rejected with ILLEGAL REQUEST
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"

login_and_wait 2
read -r -a luns <<<"$(disk_luns)"
sd=$(lun_sd "${luns[0]}") sg=$(lun_sg "${luns[0]}")
bs=$(block_size "$sg"); bs=${bs:-512}
blocks=$(($(blockdev --getsize64 "$sd") / bs))
MiB=$((1 << 20))

# medium_is FILE WHAT: the first and the last MiB of LUN 0 hold FILE (one MiB) when read direct.
medium_is() {
  local at
  for at in 0 $((blocks * bs / MiB - 1)); do
    if cmp -s "$1" <(dd if="$sd" bs=$MiB skip="$at" count=1 iflag=direct status=none); then
      echo "MiB $at holds $2: OK"
    else
      fail "MiB $at of LUN 0 does not hold $2"
    fi
  done
}

# pattern_mib BYTES OUT: one MiB of the initialization pattern BYTES (a file) repeated (the
# file doubled until it is long enough: a few commands, not one per repetition).
pattern_mib() {
  cp "$1" /tmp/pattern.x
  while (($(stat -c %s /tmp/pattern.x) < MiB)); do
    cat /tmp/pattern.x /tmp/pattern.x >/tmp/pattern.y && mv /tmp/pattern.y /tmp/pattern.x
  done
  head -c $MiB /tmp/pattern.x >"$2"
}

step "LUN ${luns[0]}: $sd $sg, $blocks blocks of $bs bytes  [t=$(t)s]"
head -c $MiB /dev/urandom | dd of="$sd" bs=$MiB oflag=direct conv=fsync status=none

step "OVERWRITE, waiting for it (IMMED=0)  [t=$(t)s]"
printf 'pyta' >/tmp/pat1
pattern_mib /tmp/pat1 /tmp/pat1.mib
check "sg_sanitize --overwrite --wait" sg_sanitize --quick --overwrite --pattern=/tmp/pat1 --wait "$sg"
blockdev --flushbufs "$sd"
medium_is /tmp/pat1.mib "the pattern 'pyta'"

step "OVERWRITE with --early (IMMED=1), progress from REQUEST SENSE  [t=$(t)s]"
head -c 512 /dev/urandom >/tmp/pat2
pattern_mib /tmp/pat2 /tmp/pat2.mib
check "sg_sanitize --overwrite --early" sg_sanitize --quick --overwrite --pattern=/tmp/pat2 --early "$sg"
out=$(sg_requests --progress "$sg" 2>&1)
echo "$out" | sed 's/^/    /'
grep -qi 'progress indication' <<<"$out" || fail "sg_requests --progress showed no progress indication while the sanitize ran"
rc=0; out=$(sg_raw -r "$bs" "$sg" 28 00 00 00 00 00 00 00 01 00 2>&1) || rc=$?   # READ(10)
echo "$out" | sed 's/^/    /'
grep -qi 'sanitize in progress' <<<"$out" || fail "a READ during the sanitize did not fail with SANITIZE IN PROGRESS (exit $rc)"
check "sg_requests --progress --num=20 until done" sg_requests --progress --num=20 "$sg"
sg_turs "$sg" || fail "TEST UNIT READY after the sanitize"
blockdev --flushbufs "$sd"
medium_is /tmp/pat2.mib "the 512-byte random pattern"

step "BLOCK ERASE, waiting and early  [t=$(t)s]"
head -c $MiB /dev/zero >/tmp/zero.mib
check "sg_sanitize --block --wait" sg_sanitize --quick --block --wait "$sg"
blockdev --flushbufs "$sd"
medium_is /tmp/zero.mib "zeros"
out=$(sg_get_lba_status --maxlen=64 "$sg" 2>&1); echo "$out" | sed 's/^/    /'
grep -qiE 'deallocated|unmapped' <<<"$out" || fail "GET LBA STATUS does not report the LUN deallocated"
head -c $MiB /dev/urandom | dd of="$sd" bs=$MiB oflag=direct conv=fsync status=none
check "sg_sanitize --block --early" sg_sanitize --quick --block --early "$sg"
sg_requests --progress --num=20 "$sg"
blockdev --flushbufs "$sd"
medium_is /tmp/zero.mib "zeros"

step "CRYPTOGRAPHIC ERASE is rejected  [t=$(t)s]"
rc=0; out=$(sg_sanitize --quick --crypto --wait "$sg" 2>&1) || rc=$?
echo "$out" | sed 's/^/    /'
((rc == 5)) || grep -qi 'illegal request' <<<"$out" || fail "sg_sanitize --crypto: exit status $rc, expected ILLEGAL REQUEST (5)"

step "WRITE ATOMIC(16) on LUN ${luns[1]} (backing file on XFS)  [t=$(t)s]"
sg1=$(lun_sg "${luns[1]}") sd1=$(lun_sd "${luns[1]}")
bs1=$(block_size "$sg1"); bs1=${bs1:-512}
bl=$(vpd_bytes bl "$sg1")
unit=$(be "$bl" 44 4) align=$(be "$bl" 48 4) gran=$(be "$bl" 52 4)
echo "VPD B0h: MAXIMUM ATOMIC TRANSFER LENGTH $unit, ATOMIC ALIGNMENT $align, GRANULARITY $gran"
((unit > 0)) || die "LUN ${luns[1]}: no atomic writes advertised"
((align == unit && gran == unit)) || fail "atomic alignment/granularity differ from the maximum"
for f in atomic_write_unit_min_bytes atomic_write_unit_max_bytes; do
  [[ -r /sys/block/${sd1#/dev/}/queue/$f ]] && echo "    $f: $(cat /sys/block/${sd1#/dev/}/queue/$f)"
done
len=$((unit * bs1)) lba=$((4 * unit))
head -c "$len" /dev/urandom >/tmp/atomic
hexlba=$(printf '%016x' "$lba" | sed 's/../& /g') hexlen=$(printf '%04x' "$unit" | sed 's/../& /g')
check "sg_raw WRITE ATOMIC(16) of $unit blocks at LBA $lba" \
  sg_raw -s "$len" -i /tmp/atomic "$sg1" 9c 00 $hexlba 00 00 $hexlen 00 00
if cmp -s /tmp/atomic <(dd if="$sd1" bs="$bs1" skip="$lba" count="$unit" iflag=direct status=none); then
  echo "the atomic write reads back: OK"
else
  fail "the atomic write does not read back"
fi
hexlen2=$(printf '%04x' $((2 * unit)) | sed 's/../& /g')
head -c $((2 * len)) /dev/urandom >/tmp/atomic2
rc=0; out=$(sg_raw -s $((2 * len)) -i /tmp/atomic2 "$sg1" 9c 00 $hexlba 00 00 $hexlen2 00 00 2>&1) || rc=$?
echo "$out" | sed 's/^/    /'
grep -qi 'illegal request' <<<"$out" || fail "WRITE ATOMIC(16) of twice the maximum was not rejected (exit $rc)"
misaligned=$(printf '%016x' $((lba + 1)) | sed 's/../& /g')
rc=0; out=$(sg_raw -s "$len" -i /tmp/atomic "$sg1" 9c 00 $misaligned 00 00 $hexlen 00 00 2>&1) || rc=$?
echo "$out" | sed 's/^/    /'
grep -qi 'illegal request' <<<"$out" || fail "a misaligned WRITE ATOMIC(16) was not rejected (exit $rc)"

step "logout  [t=$(t)s]"
logout_and_wait
summary
