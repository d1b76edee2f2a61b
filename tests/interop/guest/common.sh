# common.sh - helpers shared by pytarget's guest scripts (fs.sh, unmap.sh, caw.sh, xcopy.sh,
# odx.sh, pr.sh).
# Sourced after the harness's lib.sh; passed into the guest with
#   linux-initiator run -f tests/interop/guest/common.sh ... SCRIPT
# and found there as "$FILES_DIR/common.sh".
#
# On top of lib.sh's FAILS counter this keeps the first failure's description, so the last
# lines of a failed run say which step broke first:
#   fail TEXT           count a failure (without running anything)
#   check TEXT CMD...   echo and run CMD; on a non-zero exit count a failure named TEXT;
#                       returns CMD's exit status so a caller can stop early
#   die TEXT            count a failure, show the kernel log tail, summarise and exit 1
#   summary             print the "FIRST FAILURE:" line (when there is one) and `finish`
#   host_sync NAME      pause until the host has looked at the backing files (see below)

FIRST_FAILURE=${FIRST_FAILURE:-}

fail() {
  FAILS=$((FAILS + 1))
  [[ -n $FIRST_FAILURE ]] || FIRST_FAILURE="$*"
  printf 'FAIL: %s\n' "$*"
}

check() {
  local what=$1 rc=0
  shift
  printf '$ %s\n' "$*"
  "$@" 2>&1 || rc=$?
  ((rc == 0)) || fail "$what (exit status $rc)"
  return "$rc"
}

summary() {
  [[ -z $FIRST_FAILURE ]] || printf 'FIRST FAILURE: %s\n' "$FIRST_FAILURE"
  finish
}

die() {
  fail "$*"
  echo "--- kernel log tail"
  dmesg | tail -25
  summary
}

# kernel_errors SINCE_LINE [UNTIL_LINE]: kernel log lines after line SINCE_LINE (up to line
# UNTIL_LINE) that point at trouble on the iSCSI path (I/O errors, connection errors, digest
# errors, resets, aborts, failed commands); the unit attention every login causes ("Power-on
# or device reset occurred") and ALUA's informational line are not trouble.
kernel_errors() {
  dmesg | sed -n "$(($1 + 1)),${2:-\$}p" \
    | grep -Ei 'I/O error|conn(ection)? error|digest|reset|abort|timed? ?out|critical|EXT4-fs error|rejecting I/O|Sense Key|FAILED Result' \
    | grep -Ev 'Power-on or device reset occurred|alua: transition timeout' \
    || true
}
dmesg_lines() { dmesg | wc -l; }

# two_disks: the first two disk LUNs of the session as A and B; sets luns, sdA, sgA, sdB, sgB
# and bs (A's logical block size, 512 when it cannot be read).
two_disks() {
  read -r -a luns <<<"$(disk_luns)"
  sdA=$(lun_sd "${luns[0]}") sgA=$(lun_sg "${luns[0]}")
  sdB=$(lun_sd "${luns[1]}") sgB=$(lun_sg "${luns[1]}")
  bs=$(block_size "$sgA"); bs=${bs:-512}
}

# report_kernel_errors LINES: the verdict on the kernel log lines a script found (with
# kernel_errors, minus what it expects): each one shown and one failure, or an all-clear.
report_kernel_errors() {
  if [[ -n $1 ]]; then
    echo "$1"
    fail "kernel reported $(wc -l <<<"$1") unexpected error line(s) on the iSCSI path"
  else
    echo "no unexpected I/O, connection, digest or reset errors in the kernel log"
  fi
}

# host_sync NAME [TIMEOUT]: when the host asked for it (HOST_SYNC=1), create
# $OUT_DIR/mark.NAME and wait up to TIMEOUT seconds (default 60) for the host to answer
# with $FILES_DIR/ack.NAME.  Both directories live on the harness's 9p job share, so the
# host sees the mark while the guest is still running.  Without HOST_SYNC it does nothing.
host_sync() {
  local name=$1 limit=${2:-60} end
  [[ ${HOST_SYNC:-0} == 1 ]] || return 0
  sync
  : >"$OUT_DIR/mark.$name"
  end=$((SECONDS + limit))
  while [[ ! -e $FILES_DIR/ack.$name ]]; do
    if ((SECONDS >= end)); then
      fail "host did not acknowledge mark '$name' within ${limit}s"
      return 1
    fi
    sleep 0.2
  done
  echo "host acknowledged mark '$name' at t=$(t)s"
}

# session_param NAME: a negotiated parameter of the (single) session to $TARGET_IQN, from
# `iscsiadm -m session -P 2` (e.g. HeaderDigest, DataDigest, MaxRecvDataSegmentLength).
session_param() {
  iscsiadm -m session -P 2 2>/dev/null | awk -v k="$1:" '$1 == k { print $2; exit }'
}

# logout_and_wait: log out of $TARGET_IQN and wait until its disks are gone.
logout_and_wait() {
  local end
  check "logout" iscsiadm -m node -T "$TARGET_IQN" --logout || return 1
  end=$((SECONDS + 20))
  while [[ -n $(iscsi_devices 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.2; done
  if iscsiadm -m session >/dev/null 2>&1; then
    fail "a session is still open after logout"; iscsiadm -m session; return 1
  fi
  udevadm settle --timeout=10 2>/dev/null
  return 0
}

# vpd_bytes PAGE DEV: the VPD page's bytes (header included) as decimal numbers, one
# line, read with `sg_vpd --raw`; empty when the page cannot be read.
vpd_bytes() { sg_vpd -p "$1" -r "$2" 2>/dev/null | od -An -tu1 -v | tr -s ' \n' ' '; }

# be BYTES OFFSET LEN: big-endian unsigned value of LEN bytes at OFFSET of the space
# separated decimal byte list BYTES (as vpd_bytes prints it).
be() {
  local -a b
  read -r -a b <<<"$1"
  local i v=0
  for ((i = $2; i < $2 + $3; i++)); do v=$((v * 256 + ${b[i]:-0})); done
  echo "$v"
}

# ---------------------------------------------------------------- large data ranges (xcopy, odx)
# Ranges of many MiB move as RANGE_PARTS (default 4) equal parts, each its own O_DIRECT dd
# stream of 1 MiB requests, all in parallel: under TCG one stream is latency-bound (about
# 10 MiB/s either way), four together move about three times as much.  Offsets and lengths are
# in MiB; lengths must be multiples of RANGE_PARTS.
RANGE_PARTS=${RANGE_PARTS:-4}

# secs_since T0: seconds of guest uptime since T0 (a `t` value), one decimal.
secs_since() { awk -v a="$1" -v b="$(t)" 'BEGIN { printf "%.1f", b - a }'; }

# make_source FILE MIB: MIB MiB of random data in FILE (the guest's /tmp is RAM); its sha256
# is computed in the background (source_sha256 FILE waits for it and prints it).
make_source() {
  rm -f "$1.sha256"
  head -c "$2"M /dev/urandom >"$1" || { fail "cannot create $2 MiB of random data in $1"; return 1; }
  (sha256sum "$1" | cut -d' ' -f1 >"$1.sha256.tmp" && mv "$1.sha256.tmp" "$1.sha256") &
}
source_sha256() {
  local end=$((SECONDS + 120))
  while [[ ! -s $1.sha256 ]] && ((SECONDS < end)); do sleep 0.2; done
  cat "$1.sha256" 2>/dev/null || echo "(sha256 of $1 not available)"
}

# expect_copy WHAT DEV OFFSET_MIB MIB SRC_DEV [SRC_OFFSET_MIB]: expect_range against
# /tmp/src.bin (the source data, written to SRC_DEV at 0) at SRC_OFFSET_MIB (default 0); after
# the first mismatch of a run the source range on SRC_DEV is read back too, to tell a bad copy
# from source data that never arrived.
expect_copy() {
  expect_range "$1" "$2" "$3" "$4" /tmp/src.bin "${6:-0}" && return 0
  if [[ -z ${SOURCE_RECHECKED:-} ]]; then
    SOURCE_RECHECKED=1
    expect_range "diagnosis: the source on $5" "$5" "${6:-0}" "$4" /tmp/src.bin "${6:-0}" \
      && echo "diagnosis: the source reads back intact, so the copy is wrong"
  fi
  return 1
}

# write_range REF DEV OFFSET_MIB MIB: write the first MIB MiB of REF to DEV at OFFSET_MIB MiB
# (parallel O_DIRECT streams), then flush the device.
write_range() {
  local ref=$1 dev=$2 off=$3 mib=$4 per i rc=0 t0
  per=$((mib / RANGE_PARTS))
  t0=$(t)
  echo "\$ dd if=$ref of=$dev bs=1M seek=$off count=$mib oflag=direct   # as $RANGE_PARTS parallel streams"
  for ((i = 0; i < RANGE_PARTS; i++)); do
    dd if="$ref" of="$dev" bs=1M skip=$((i * per)) seek=$((off + i * per)) count="$per" \
       oflag=direct conv=notrunc status=none &
  done
  for ((i = 0; i < RANGE_PARTS; i++)); do wait -n || rc=$?; done
  blockdev --flushbufs "$dev" 2>/dev/null
  ((rc == 0)) || { fail "writing $mib MiB at $off MiB of $dev (dd exit status $rc)"; return 1; }
  echo "wrote $mib MiB at $off MiB of $dev in $(secs_since "$t0")s"
}

# expect_range WHAT DEV OFFSET_MIB MIB REF [REF_OFFSET_MIB]: the MIB MiB at OFFSET_MIB MiB of
# DEV, read back with O_DIRECT (no page cache), must equal the MIB MiB at REF_OFFSET_MIB
# (default 0) of REF (a file, or /dev/zero for zeros); compared with cmp, part by part in
# parallel.  A mismatch names the first differing byte of every bad part as an offset into DEV.
expect_range() {
  local what=$1 dev=$2 off=$3 mib=$4 ref=$5 roff=${6:-0} per i t0 dir bad=() out base
  per=$((mib / RANGE_PARTS))
  dir=$(mktemp -d)
  t0=$(t)
  for ((i = 0; i < RANGE_PARTS; i++)); do
    (
      rc=0
      cmp <(dd if="$ref" bs=1M skip=$((roff + i * per)) count="$per" status=none) \
          <(dd if="$dev" bs=1M skip=$((off + i * per)) count="$per" iflag=direct status=none) \
          >"$dir/$i" 2>&1 || rc=$?
      echo "$rc" >"$dir/$i.rc"
    ) &
  done
  wait
  for ((i = 0; i < RANGE_PARTS; i++)); do
    [[ $(cat "$dir/$i.rc") == 0 ]] && continue
    base=$(((off + i * per) * 1048576))
    out=$(awk -v base="$base" '/differ/ { sub(",", "", $5); b = base + $5 - 1;
            printf "first difference at byte %d (%.4f MiB)", b, b / 1048576; next }
          /EOF/ { printf "short read (EOF) in the part at %d MiB", base / 1048576; next }
          { printf "%s ", $0 }' "$dir/$i")
    bad+=("part $i: ${out:-cmp failed}")
  done
  rm -rf "$dir"
  if ((${#bad[@]} == 0)); then
    echo "$what: $mib MiB at $off MiB of $dev equal those at $roff MiB of $ref" \
         "(read in $(secs_since "$t0")s)"
    return 0
  fi
  fail "$what: $mib MiB at $off MiB of $dev differ from $ref (at $roff MiB) in ${#bad[@]} of $RANGE_PARTS" \
       "parts of $per MiB: $(printf '%s; ' "${bad[@]}")"
  return 1
}
