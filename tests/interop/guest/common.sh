# common.sh - helpers shared by pytarget's guest scripts (tests/interop/guest/*.sh).
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
# with $OUT_DIR/ack.NAME.  $OUT_DIR lives on the harness's 9p job share, so the host sees the
# mark while the guest is still running; each part of a shared boot has its own $OUT_DIR, so
# two parts may use the same NAME.  Without HOST_SYNC it does nothing.
host_sync() {
  local name=$1 limit=${2:-60} end
  [[ ${HOST_SYNC:-0} == 1 ]] || return 0
  sync
  : >"$OUT_DIR/mark.$name"
  end=$((SECONDS + limit))
  while [[ ! -e $OUT_DIR/ack.$name ]]; do
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

# ---------------------------------------------------------------- persistent reservations
# (pr.sh, gateways_pr.sh) Each I_T nexus is an sg node; the caller's associative array NAME
# names them in messages (NAME[/dev/sg1]=A), PR_TYPE_TEXT is sg_persist's name of the type the
# reservations are taken with (expect_reservation), and `lba` / `bs` the block that io and
# holds use.

# pr_out SG EXPECT ARGS...: sg_persist -n -o ARGS through SG; EXPECT is good or conflict
# (RESERVATION CONFLICT: sg3_utils exit status 24).
pr_out() {
  local sg=$1 expect=$2 out rc=0
  shift 2
  echo "\$ sg_persist -n -o $* $sg   # ${NAME[$sg]}, expect $expect"
  out=$(sg_persist -n -o "$@" "$sg" 2>&1) || rc=$?
  [[ -z $out ]] || sed 's/^/    /' <<<"$out"
  case $expect:$rc in
    good:0) echo "  -> GOOD" ;;
    conflict:24) echo "  -> RESERVATION CONFLICT, as expected" ;;
    *) fail "${NAME[$sg]}: sg_persist -o $*: exit status $rc, expected $expect" ;;
  esac
}

# pr_in SG ARGS...: sg_persist -n -i ARGS through SG; output in PR_IN.
pr_in() {
  local sg=$1 rc=0
  shift
  echo "\$ sg_persist -n -i $* $sg   # ${NAME[$sg]}"
  PR_IN=$(sg_persist -n -i "$@" "$sg" 2>&1) || rc=$?
  sed 's/^/    /' <<<"$PR_IN"
  ((rc == 0)) || fail "${NAME[$sg]}: sg_persist -i $*: exit status $rc"
  return "$rc"
}

# pr_generation: the PRGENERATION of the last pr_in (hex, as sg_persist prints it).
pr_generation() { sed -n 's/.*PR generation=\(0x[0-9a-fA-F]*\).*/\1/p' <<<"$PR_IN" | head -1; }

# expect_keys SG GEN KEY...: READ KEYS through SG lists exactly KEY... with PRGENERATION GEN
# (decimal).
expect_keys() {
  local sg=$1 gen=$2 got want g
  shift 2
  pr_in "$sg" -k || return
  got=$(grep -Eio '^ +0x[0-9a-f]+ *$' <<<"$PR_IN" | tr -d ' ' | tr 'A-F' 'a-f' | sort | tr '\n' ' ')
  want=$(printf '%s\n' "$@" | sed '/^$/d' | sort | tr '\n' ' ')
  if [[ $got == "$want" ]]; then echo "  registered keys: ${want:-none}, as expected"
  else fail "${NAME[$sg]}: READ KEYS: registered keys '${got% }', expected '${want% }'"; fi
  g=$(pr_generation)
  if [[ -n $g ]] && ((g == gen)); then echo "  PRGENERATION $gen, as expected"
  else fail "${NAME[$sg]}: READ KEYS: PRGENERATION ${g:-?}, expected $gen"; fi
}

# expect_reservation SG KEY|none: READ RESERVATION through SG shows KEY holding an LU_SCOPE
# reservation of type PR_TYPE_TEXT, or none.
expect_reservation() {
  local sg=$1 key=$2 got
  pr_in "$sg" -r || return
  if [[ $key == none ]]; then
    if grep -qi 'NO reservation held' <<<"$PR_IN"; then echo "  no reservation, as expected"
    else fail "${NAME[$sg]}: READ RESERVATION: a reservation is held, expected none"; fi
    return
  fi
  got=$(sed -n 's/.*Key=\(0x[0-9a-fA-F]*\).*/\1/p' <<<"$PR_IN" | head -1 | tr 'A-F' 'a-f')
  [[ $got == "$key" ]] || fail "${NAME[$sg]}: READ RESERVATION: key '${got:-none}', expected $key"
  if grep -Eqi "scope: *LU_SCOPE, *type: *$PR_TYPE_TEXT *\$" <<<"$PR_IN"; then
    [[ $got == "$key" ]] && echo "  reservation: key $key, LU_SCOPE, $PR_TYPE_TEXT, as expected"
  else fail "${NAME[$sg]}: READ RESERVATION: not LU_SCOPE, $PR_TYPE_TEXT"; fi
}

# io SG read|write EXPECT [FILE]: one READ(10)/WRITE(10) of the block at $lba through SG with
# sg_raw (no retries, the status as the target sent it); EXPECT good or conflict.  A read
# lands in /tmp/read.bin.
io() {
  local sg=$1 op=$2 expect=$3 file=${4:-} cdb out rc=0 status
  cdb="$(printf '%02x %02x %02x %02x' $((lba >> 24 & 255)) $((lba >> 16 & 255)) $((lba >> 8 & 255)) $((lba & 255))) 00 00 01 00"
  if [[ $op == write ]]; then
    echo "\$ sg_raw -s $bs -i $file $sg 2a 00 $cdb   # ${NAME[$sg]} WRITE(10), expect $expect"
    out=$(sg_raw -s "$bs" -i "$file" "$sg" 2a 00 $cdb 2>&1) || rc=$?
  else
    rm -f /tmp/read.bin
    echo "\$ sg_raw -r $bs -o /tmp/read.bin $sg 28 00 $cdb   # ${NAME[$sg]} READ(10), expect $expect"
    out=$(sg_raw -r "$bs" -o /tmp/read.bin "$sg" 28 00 $cdb 2>&1) || rc=$?
  fi
  status=$(sed -n 's/^SCSI Status: *//p' <<<"$out" | head -1 | sed 's/ *$//')
  echo "  -> SCSI status '${status:-?}', exit status $rc"
  case $expect in
    good) [[ $rc == 0 && $status == Good ]] \
            || { sed 's/^/    /' <<<"$out"; fail "${NAME[$sg]} ${op^^}: status '${status:-?}' (exit $rc), expected GOOD"; } ;;
    conflict) [[ $status == "Reservation Conflict" && $rc != 0 ]] \
            || { sed 's/^/    /' <<<"$out"; fail "${NAME[$sg]} ${op^^}: status '${status:-?}' (exit $rc), expected RESERVATION CONFLICT"; } ;;
  esac
}

# holds SG FILE WHAT: the block at $lba, read through SG, equals FILE.
holds() {
  io "$1" read good
  if cmp -s "$2" /tmp/read.bin; then echo "  block $lba holds $3"
  else fail "block $lba does not hold $3"; fi
}

# expect_ua SG TEXT|none: TEST UNIT READY through SG ends with UNIT ATTENTION whose additional
# sense is TEXT (sg3_utils' name of the ASC/ASCQ pair: "Registrations preempted" is 2Ah/05h,
# "Reservations preempted" 2Ah/03h), or GOOD.
expect_ua() {
  local sg=$1 want=$2 out rc=0
  echo "\$ sg_turs -v $sg   # ${NAME[$sg]}, expect ${want}"
  out=$(sg_turs -v "$sg" 2>&1) || rc=$?
  sed 's/^/    /' <<<"$out"
  if [[ $want == none ]]; then
    ((rc == 0)) && echo "  -> GOOD, no unit attention" \
      || fail "${NAME[$sg]}: TEST UNIT READY exit status $rc, expected GOOD (no unit attention)"
  elif ((rc == 6)) && grep -qi 'Sense key: *Unit Attention' <<<"$out" \
      && grep -qi "Additional sense: *$want *$" <<<"$out"; then
    echo "  -> UNIT ATTENTION, $want, as expected"
  else
    fail "${NAME[$sg]}: TEST UNIT READY exit status $rc, expected UNIT ATTENTION, $want"
  fi
}

# ---------------------------------------------------------------- two gateways, two paths
# (gateways_multipath.sh, gateways_failover.sh, gateways_pr.sh) One session per gateway, so
# LUN 0 has a path through each; sd1 and sd2 are the caller's names of the two paths' disks.

# lun0_via PORT [sd|sg]: LUN 0's disk (default) or sg node name through the session to
# 127.0.0.1:PORT.
lun0_via() {
  local lun hctl type sd sg session iface port
  while read -r lun hctl type sd sg session iface; do
    [[ $lun == 0 && $sd != - && $sg != - ]] || continue
    port=$(cat /sys/class/iscsi_session/"$session"/device/connection*/iscsi_connection/*/persistent_port 2>/dev/null | head -n 1)
    [[ $port == "$1" ]] || continue
    if [[ ${2:-sd} == sg ]]; then echo "$sg"; else echo "$sd"; fi
    return
  done < <(iscsi_devices)
}

# discover_each / login_each: SendTargets discovery through each portal of the caller's
# `portals` array / a login to $TARGET_IQN through each; one that fails ends the script.
discover_each() {
  local p
  for p in "${portals[@]}"; do
    check "discovery through $p" iscsiadm -m discovery -t sendtargets -p "$p" \
      || die "discovery through $p failed"
  done
}
login_each() {
  local p
  for p in "${portals[@]}"; do
    check "login through $p" iscsiadm -m node -T "$TARGET_IQN" -p "$p" --login \
      || die "login through $p failed"
  done
}

# two_paths: wait up to 30 s for LUN 0's two disk paths and name them: sd1 through the first
# portal (gateway 1), sd2 through the second.
two_paths() {
  local paths=0 end=$((SECONDS + 30))
  while ((SECONDS < end)); do
    paths=$(iscsi_devices | awk '$1 == 0 && $3 == 0 && $4 != "-"' | wc -l)
    ((paths >= 2)) && break
    sleep 0.2
  done
  ((paths >= 2)) || die "LUN 0 has $paths path(s), expected 2"
  udevadm settle
  sd1=$(lun0_via "${portals[0]##*:}") sd2=$(lun0_via "${portals[1]##*:}")
  echo "LUN 0: $sd1 through gateway 1, $sd2 through gateway 2"
  [[ -n $sd1 && -n $sd2 ]] || die "cannot tell the two paths apart"
}

# alua_devices NO_PATH_RETRY: the multipath.conf `devices` section for pytarget's disks behind
# two gateways: the ALUA handler and priorities, paths grouped by priority, failback at once.
alua_devices() {
  cat <<EOF
devices {
    device {
        vendor "PYTARGET"
        product "pytarget disk"
        hardware_handler "1 alua"
        prio alua
        path_grouping_policy group_by_prio
        path_selector "service-time 0"
        failback immediate
        no_path_retry $1
    }
}
EOF
}

alua_state() { cat "/sys/block/$1/device/access_state" 2>/dev/null; }

# expect_states STATE1 STATE2 [SECONDS]: wait (default 30 s) for the kernel's ALUA states of
# $sd1 (through gateway 1) and $sd2 (through gateway 2).
expect_states() {
  local end=$((SECONDS + ${3:-30}))
  while ((SECONDS < end)); do
    [[ $(alua_state "$sd1") == "$1" && $(alua_state "$sd2") == "$2" ]] && break
    # a command on each path brings its unit attention and the re-read of the port groups
    sg_turs "/dev/$sd1" >/dev/null 2>&1; sg_turs "/dev/$sd2" >/dev/null 2>&1
    sleep 0.5
  done
  echo "access_state: $sd1 (gateway 1) $(alua_state "$sd1"), $sd2 (gateway 2) $(alua_state "$sd2")"
  [[ $(alua_state "$sd1") == "$1" ]] || fail "$sd1 through gateway 1 is $(alua_state "$sd1"), not $1"
  [[ $(alua_state "$sd2") == "$2" ]] || fail "$sd2 through gateway 2 is $(alua_state "$sd2"), not $2"
}

# expect_groups SD_ACTIVE SD_ENABLED [SECONDS]: multipath -ll shows two path groups, SD_ACTIVE
# ready in the active one, SD_ENABLED ready in the enabled one (waiting up to SECONDS, 30).
expect_groups() {
  local out groups end=$((SECONDS + ${3:-30}))
  while ((SECONDS < end)); do
    out=$(multipath -ll 2>/dev/null)
    groups=$(grep -c 'policy=' <<<"$out")
    ((groups == 2)) && grep -A1 'status=active' <<<"$out" | grep -q " $1 .*active ready" \
      && grep -A1 'status=enabled' <<<"$out" | grep -q " $2 .*active ready" && break
    sleep 0.5
  done
  printf '$ multipath -ll\n%s\n' "$out"
  ((groups == 2)) || fail "multipath -ll shows $groups path group(s), expected 2"
  grep -A1 'status=active' <<<"$out" | grep -q " $1 .*active ready" \
    || fail "the active path group does not hold $1 ready"
  grep -A1 'status=enabled' <<<"$out" | grep -q " $2 .*active ready" \
    || fail "the enabled path group does not hold $2 ready"
}

# flush_map MAP: remove the multipath map (udev or multipathd may hold it for a moment).
flush_map() {
  local end=$((SECONDS + 20))
  udevadm settle
  until multipath -f "$1" 2>/dev/null || ((SECONDS >= end)); do sleep 0.5; done
}
