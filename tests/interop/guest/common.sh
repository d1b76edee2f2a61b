# common.sh - helpers shared by pytarget's guest scripts (fs.sh, unmap.sh, caw.sh).
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

# kernel_errors SINCE_LINE: kernel log lines after line SINCE_LINE that point at trouble on
# the iSCSI path (I/O errors, connection errors, digest errors, resets, aborts, failed
# commands); the unit attention every login causes ("Power-on or device reset occurred")
# and ALUA's informational line are not trouble.
kernel_errors() {
  dmesg | tail -n +"$(($1 + 1))" \
    | grep -Ei 'I/O error|conn(ection)? error|digest|reset|abort|timed? ?out|critical|EXT4-fs error|rejecting I/O|Sense Key|FAILED Result' \
    | grep -Ev 'Power-on or device reset occurred|alua: transition timeout' \
    || true
}
dmesg_lines() { dmesg | wc -l; }

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
