#!/bin/bash
# xcopy.sh - EXTENDED COPY (LID1) through the Linux initiator, with sg3_utils' sg_xcopy and
# with ddpt, between two LUNs and within one.
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/xcopy.sh
#
# Needs two disk LUNs with 512-byte blocks: A (>= XCOPY_MB + XCOPY_SMALL_MB MiB) and
# B (>= 2 x XCOPY_MB + XCOPY_SMALL_MB MiB); thin ones cost nothing on the host.  XCOPY_MB MiB of
# random data (sha256 recorded) are written to A at 0, then copied by the copy manager, and
# every destination range is read back with O_DIRECT (no page cache) and compared with the
# source (cmp, part by part; after a mismatch the source range on A is read back too, to tell
# a bad copy from bad source data).  Offsets in MiB, M = XCOPY_MB, S = XCOPY_SMALL_MB:
#   (a) sg_xcopy A[0, M) -> B[0]  with --on_dst (the command goes to B's device server)
#       sg_xcopy A[0, M) -> B[M]  with --on_src (the command goes to A's)
#   (b) sg_xcopy A[0, S) -> A[M], within one LUN (source and destination do not overlap)
#   (c) ddpt --xcopy A[0, S) -> B[2M], one XCOPY of DDPT_BPT blocks per ddpt run
# and at the end the first and last 4 MiB of the source range still hold the source data.
# Before that: standard INQUIRY 3PC=1, `sg_vpd -p tpc` (VPD 8Fh) lists EXTENDED COPY(LID1), and
# `sg_copy_results --params` (RECEIVE COPY OPERATING PARAMETERS) answers and implements segment
# descriptor 02h (block -> block) and CSCD descriptor E4h (identification), which both tools use.
#
# Why one ddpt run per XCOPY: ddpt 0.97 (the guest's) builds every XCOPY(LID1) parameter list of
# a run from the lowest LBA of its skip=/seek= lists (a_xcopy_lid1_cmd() in ddpt_xcopy.c uses
# i_sgli.lowest_lba / o_sgli.lowest_lba, which its copy loop never advances), so a run with
# count > bpt sends the same source and destination LBAs with every command.
# Environment: XCOPY_MB (256), XCOPY_SMALL_MB (256, at most XCOPY_MB), DDPT_BPT (32768 blocks
# per ddpt run).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
mib=${XCOPY_MB:-256} smib=${XCOPY_SMALL_MB:-256} chunk=${DDPT_BPT:-32768}
klog0=$(dmesg_lines)

login_and_wait 2
two_disks
blocks=$((mib * 1048576 / bs)) sblocks=$((smib * 1048576 / bs)) mibblocks=$((1048576 / bs))
echo "LUN ${luns[0]} = A ($sdA $sgA), LUN ${luns[1]} = B ($sdB $sgB); block size $bs;" \
     "$mib MiB = $blocks blocks, $smib MiB = $sblocks blocks"
((smib <= mib && mib % 4 == 0 && smib % 4 == 0)) || die "XCOPY_SMALL_MB must be <= XCOPY_MB, both multiples of 4"
((bs == 512)) || die "xcopy.sh expects 512-byte blocks, LUN A has $bs"
[[ $(block_size "$sgB") == 512 ]] || die "xcopy.sh expects 512-byte blocks on LUN B too"
capA=$(blockdev --getsize64 "$sdA") capB=$(blockdev --getsize64 "$sdB")
((capA >= (mib + smib) * 1048576)) || die "LUN A has $capA bytes, needs $mib + $smib MiB"
((capB >= (2 * mib + smib) * 1048576)) || die "LUN B has $capB bytes, needs 2 x $mib + $smib MiB"

# xcopy_run WHAT CMD...: run a copy command, show its output and how long it took.
xcopy_run() {
  local what=$1 rc=0 t0 out
  shift
  echo "\$ $*"
  t0=$(t)
  out=$("$@" 2>&1) || rc=$?
  [[ -z $out ]] || sed 's/^/    /' <<<"$out"
  echo "  -> exit status $rc after $(secs_since "$t0")s"
  ((rc == 0)) || fail "$what (exit status $rc)"
  return "$rc"
}

# ------------------------------------------------------------------------ capabilities
step "1. third-party copy capabilities  [t=$(t)s]"
if sg_inq "$sgA" | grep -q '3PC=1'; then echo "standard INQUIRY: 3PC=1"
else fail "standard INQUIRY of $sgA does not report 3PC=1"; fi
vpd=$(sg_vpd -p tpc "$sgA" 2>&1) || fail "sg_vpd -p tpc $sgA (VPD 8Fh) failed"
echo "\$ sg_vpd -p tpc $sgA"; echo "$vpd"
grep -qi 'Extended copy(LID1)' <<<"$vpd" || fail "VPD 8Fh does not list EXTENDED COPY(LID1)"
params=$(sg_copy_results --params "$sgB" 2>&1) || fail "sg_copy_results --params $sgB failed"
echo "\$ sg_copy_results --params $sgB"; echo "$params"
grep -qi 'Segment descriptor 0x02' <<<"$params" \
  || fail "RECEIVE COPY OPERATING PARAMETERS: segment descriptor 02h (block -> block) not implemented"
grep -qi 'Target descriptor 0xe4' <<<"$params" \
  || fail "RECEIVE COPY OPERATING PARAMETERS: CSCD descriptor E4h (identification) not implemented"

# ------------------------------------------------------------------------ source data
step "2. $mib MiB of random data onto A at 0  [t=$(t)s]"
make_source /tmp/src.bin "$mib" || die "no source data"
write_range /tmp/src.bin "$sdA" 0 "$mib" || die "writing the source data failed"
echo "source data: $mib MiB, sha256 $(source_sha256 /tmp/src.bin)"

# ------------------------------------------------------------------------ (a) A -> B
step "3a. sg_xcopy A[0] -> B[0], --on_dst  [t=$(t)s]"
xcopy_run "sg_xcopy --on_dst" \
  sg_xcopy if="$sgA" of="$sgB" bs="$bs" count="$blocks" --on_dst time=1 \
  && expect_copy "sg_xcopy --on_dst into B[0]" "$sdB" 0 "$mib" "$sdA"

step "3b. sg_xcopy A[0] -> B[$mib MiB], --on_src  [t=$(t)s]"
xcopy_run "sg_xcopy --on_src" \
  sg_xcopy if="$sgA" of="$sgB" bs="$bs" count="$blocks" seek="$blocks" --on_src time=1 \
  && expect_copy "sg_xcopy --on_src into B[$mib MiB]" "$sdB" "$mib" "$mib" "$sdA"

# ------------------------------------------------------------------------ (b) A -> A
step "4. sg_xcopy within LUN A: A[0] + $smib MiB -> A[$mib MiB]  [t=$(t)s]"
xcopy_run "sg_xcopy within one LUN" \
  sg_xcopy if="$sgA" of="$sgA" bs="$bs" skip=0 count="$sblocks" seek="$blocks" \
           --on_dst time=1 \
  && expect_copy "sg_xcopy within A into A[$mib MiB]" "$sdA" "$mib" "$smib" "$sdA" 0

# ------------------------------------------------------------------------ (c) ddpt
src0=0 dst0=$((2 * blocks))
step "5. ddpt --xcopy A[0] + $smib MiB -> B[$((2 * mib)) MiB], $chunk blocks per run  [t=$(t)s]"
ddpt_rc=0 runs=0 t0=$(t)
for ((off = 0; off < sblocks; off += chunk)); do
  n=$((sblocks - off < chunk ? sblocks - off : chunk))
  runs=$((runs + 1))
  # a new list identifier per run (LIST ID USAGE is ddpt's choice for HELD DATA LIMIT 0)
  cmd=(ddpt if="$sgA" of="$sgB" bs="$bs" bpt="$n" count="$n" skip=$((src0 + off)) seek=$((dst0 + off))
       list_id=$((runs % 256)) --xcopy)
  ((runs == 1)) && echo "\$ ${cmd[*]}   # first of $(((sblocks + chunk - 1) / chunk)) runs"
  out=$("${cmd[@]}" 2>&1) || { ddpt_rc=$?; echo "\$ ${cmd[*]}"; echo "$out"; fail "ddpt --xcopy at block $off (exit status $ddpt_rc)"; break; }
  grep -q '^1 xcopy command done' <<<"$out" \
    || { echo "$out"; fail "ddpt --xcopy at block $off did not report exactly one XCOPY command"; break; }
done
echo "ddpt: $runs run(s), exit status $ddpt_rc, $(secs_since "$t0")s"
((ddpt_rc == 0)) && expect_copy "ddpt --xcopy into B[$((2 * mib)) MiB]" "$sdB" $((2 * mib)) "$smib" "$sdA" 0

# ------------------------------------------------------------------------ wrap up
step "6. the source is intact; RECEIVE COPY RESULTS still answers  [t=$(t)s]"
expect_range "source A[0], first 4 MiB, after all copies" "$sdA" 0 4 /tmp/src.bin
expect_range "source A[0], last 4 MiB, after all copies" "$sdA" $((mib - 4)) 4 /tmp/src.bin $((mib - 4))
if sg_copy_results --params "$sgA" >/dev/null 2>&1; then echo "sg_copy_results --params $sgA: OK"
else fail "sg_copy_results --params $sgA failed after the copies"; fi

step "logout  [t=$(t)s]"
logout_and_wait
report_kernel_errors "$(kernel_errors "$klog0")"
summary
