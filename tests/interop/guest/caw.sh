#!/bin/bash
# caw.sh - COMPARE AND WRITE through the Linux initiator, on every disk LUN (the test
# target has one with 512-byte and one with 4096-byte blocks).
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/caw.sh
#
# Per LUN, at LBA CAW_LBA:
#   - VPD B0h MAXIMUM COMPARE AND WRITE LENGTH is at least 1
#   - the block holds A; compare A / write B succeeds; the block then holds B
#   - compare A (stale) / write C: exit status 14 (MISCOMPARE), the sense INFORMATION is the
#     offset of the first byte where A and B differ, the block still holds B
#   - compare B' (B with bytes 100 and 300 changed) / write C: MISCOMPARE at offset 100,
#     the block still holds B
#   - when the maximum length allows 2 blocks: a matching 2-block COMPARE AND WRITE writes
#     both blocks, and one whose compare data differs first at byte 100 of the second block
#     reports offset block size + 100 and changes neither block
#   - a COMPARE AND WRITE past the last LBA fails with ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS
#     OUT OF RANGE (sg3_utils exit status 22)
# sg3_utils prints the sense INFORMATION with -v as "Miscompare at byte offset: N" (or, in
# the decoded sense, "Info fld=0x..", "Information: 0x..."); all three forms are accepted.
# Environment: CAW_LBA (4096).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
lba=${CAW_LBA:-4096}

login_and_wait 2

# miscompare_offset TEXT: the byte offset sg3_utils reported for a miscompare, or "".
miscompare_offset() {
  local v
  v=$(sed -n 's/.*Miscompare at byte offset: *\([0-9][0-9]*\).*/\1/p' <<<"$1" | head -1)
  [[ -n $v ]] && { echo "$v"; return; }
  v=$(sed -n 's/.*Info fld=0x\([0-9a-fA-F][0-9a-fA-F]*\).*/\1/p' <<<"$1" | head -1)
  [[ -n $v ]] && { echo $((16#$v)); return; }
  v=$(sed -n 's/.*Information: 0x\([0-9a-fA-F][0-9a-fA-F]*\).*/\1/p' <<<"$1" | head -1)
  [[ -n $v ]] && echo $((16#$v))
}

# first_diff A B: 0-based offset of the first differing byte of files A and B.
first_diff() { cmp "$1" "$2" | awk '{ sub(",", "", $5); print $5 - 1 }'; }

# caw NAME BLOCKS DATAFILE [LBA]: run sg_compare_and_write -v; sets RC and OUT.
caw() {
  local at=${4:-$lba}
  RC=0
  echo "\$ sg_compare_and_write -v --in=$3 --lba=$at --num=$2 --xferlen=$((2 * $2 * bs)) $sg   # $1"
  OUT=$(sg_compare_and_write -v --in="$3" --lba="$at" --num="$2" --xferlen=$((2 * $2 * bs)) "$sg" 2>&1) || RC=$?
  [[ -z $OUT ]] || sed 's/^/    /' <<<"$OUT"
  echo "  -> exit status $RC"
}

# holds FILE BLOCKS WHAT: the BLOCKS blocks at $lba must equal FILE.
holds() {
  if cmp -s "$1" <(dd if="$sd" bs="$bs" skip="$lba" count="$2" iflag=direct status=none); then
    echo "medium holds $3: OK"
  else
    fail "LUN $lun: the medium at LBA $lba does not hold $3"
  fi
}

put() {   # put FILE BLOCKS: plain write at $lba
  dd if="$1" of="$sd" bs="$bs" seek="$lba" count="$2" oflag=direct conv=fsync status=none \
    || fail "LUN $lun: plain write at LBA $lba failed"
}

# expect_miscompare WHAT OFFSET: the last caw must have failed with MISCOMPARE at OFFSET.
expect_miscompare() {
  local off
  if ((RC != 14)); then
    fail "LUN $lun: $1: exit status $RC, expected 14 (MISCOMPARE)"
    return
  fi
  off=$(miscompare_offset "$OUT")
  if [[ $off == "$2" ]]; then echo "MISCOMPARE with INFORMATION = $off as expected"
  else fail "LUN $lun: $1: MISCOMPARE reported offset '${off:-none}', expected $2"; fi
}

# flip FILE OFFSET...: invert the bytes at the given offsets in place.
flip() {
  local f=$1 o b
  shift
  for o in "$@"; do
    b=$(od -An -tu1 -j "$o" -N 1 "$f" | tr -d ' ')
    printf "$(printf '\\%03o' $((255 - b)))" | dd of="$f" bs=1 seek="$o" conv=notrunc status=none
  done
}

for lun in $(disk_luns); do
  sd=$(lun_sd "$lun") sg=$(lun_sg "$lun")
  bs=$(block_size "$sg"); bs=${bs:-512}
  step "LUN $lun: $sd $sg, block size $bs, LBA $lba  [t=$(t)s]"
  bl=$(vpd_bytes bl "$sg")
  maxcaw=$(be "$bl" 5 1)
  echo "VPD B0h MAXIMUM COMPARE AND WRITE LENGTH: $maxcaw block(s)"
  ((maxcaw >= 1)) || fail "LUN $lun: MAXIMUM COMPARE AND WRITE LENGTH is 0"
  for x in A B C; do head -c "$bs" /dev/urandom >/tmp/$x; done
  cat /tmp/A /tmp/B >/tmp/AB; cat /tmp/A /tmp/C >/tmp/AC
  cp /tmp/B /tmp/B2; flip /tmp/B2 100 300; cat /tmp/B2 /tmp/C >/tmp/B2C
  [[ $(first_diff /tmp/B /tmp/B2) == 100 ]] || fail "test setup: B' does not differ first at byte 100"

  put /tmp/A 1
  holds /tmp/A 1 "A (written plainly)"
  caw "compare A, write B: must succeed" 1 /tmp/AB
  ((RC == 0)) || fail "LUN $lun: COMPARE AND WRITE with matching data: exit status $RC"
  holds /tmp/B 1 "B"

  caw "compare A (stale), write C: MISCOMPARE" 1 /tmp/AC
  expect_miscompare "stale compare data" "$(first_diff /tmp/A /tmp/B)"
  holds /tmp/B 1 "B (unchanged after the miscompare)"

  caw "compare B' (differs at bytes 100 and 300), write C: MISCOMPARE at 100" 1 /tmp/B2C
  expect_miscompare "compare data differing first at byte 100" 100
  holds /tmp/B 1 "B (unchanged after the miscompare)"

  if ((maxcaw >= 2)); then
    head -c $((2 * bs)) /dev/urandom >/tmp/P; head -c $((2 * bs)) /dev/urandom >/tmp/Q
    put /tmp/P 2
    cat /tmp/P /tmp/Q >/tmp/PQ
    caw "2 blocks, compare P, write Q: must succeed" 2 /tmp/PQ
    ((RC == 0)) || fail "LUN $lun: 2-block COMPARE AND WRITE with matching data: exit status $RC"
    holds /tmp/Q 2 "Q (both blocks)"
    cp /tmp/Q /tmp/Q2; flip /tmp/Q2 $((bs + 100)); cat /tmp/Q2 /tmp/P >/tmp/Q2P
    caw "2 blocks, compare Q' (differs at byte $((bs + 100))), write P: MISCOMPARE" 2 /tmp/Q2P
    expect_miscompare "compare data differing first in the second block" $((bs + 100))
    holds /tmp/Q 2 "Q (both blocks unchanged after the miscompare)"
  else
    echo "2-block COMPARE AND WRITE skipped: maximum length $maxcaw"
  fi

  last=$(($(blockdev --getsize64 "$sd") / bs - 1))
  caw "past the last LBA ($last): ILLEGAL REQUEST" 1 /tmp/AB $((last + 1))
  # sg3_utils: exit 22 = ILLEGAL REQUEST with LOGICAL BLOCK ADDRESS OUT OF RANGE, 5 = other
  if ((RC == 22)) || { ((RC == 5)) && grep -qi 'block address out of range' <<<"$OUT"; }; then
    echo "rejected with LOGICAL BLOCK ADDRESS OUT OF RANGE as expected"
  else
    fail "LUN $lun: COMPARE AND WRITE at LBA $((last + 1)): exit status $RC, expected 22 (LBA out of range)"
  fi
done

step "logout  [t=$(t)s]"
logout_and_wait
summary
