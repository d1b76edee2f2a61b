#!/bin/bash
# gateways_pr.sh - persistent reservations across two pytarget gateways of one logical unit whose
# reservations live in RADOS (docs/scale-out-consistency.md), with sg_persist and sg_raw from the
# Linux initiator. No multipathd: one session per gateway, so LUN 0 appears twice (two sd/sg
# nodes) and the initiator has two I_T nexuses to it, one through each gateway's target port.
#   1. fresh logical unit: no keys, no reservation (through both)
#   2. through gateway 1: register KA, reserve Write Exclusive (type 1); gateway 2 reports
#      exactly that (READ KEYS, READ RESERVATION)
#   3. through gateway 2, a non-registrant (the nexus through gateway 2 never registered): WRITE
#      gets RESERVATION CONFLICT, READ is GOOD; gateway 1's nexus (the holder) writes
#   4. through gateway 2: register KB, PREEMPT KA (type 1): GOOD
#   5. gateway 1's nexus: its next command gets UNIT ATTENTION, REGISTRATIONS PREEMPTED
#      (2Ah/05h, SPC-4 5.13.11.2.4.3: its registration was removed by another I_T nexus), then
#      READ KEYS shows only KB and READ RESERVATION KB, Write Exclusive; its WRITE conflicts now
#      and gateway 2's nexus (the new holder) writes; gateway 2's nexus had no unit attention
#   6. through gateway 2: CLEAR; both nexuses write again
#   linux-initiator run -p PORT_GW1 -p PORT_GW2 -t IQN gateways_pr.sh
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh"
: "${TARGET_IQN:?pass the target IQN with -t}"
read -r -a portals <<<"$TARGET_HOST_PORTALS"
((${#portals[@]} == 2)) || die "give the two gateways' ports (-p P1 -p P2)"
KA=0xa1a1a1a1 KB=0xb2b2b2b2 TYPE=1 lba=2048
klog0=$(dmesg_lines)

step "discovery through each gateway, one login each (${portals[*]})  [t=$(t)s]"
for p in "${portals[@]}"; do
  check "discovery through $p" iscsiadm -m discovery -t sendtargets -p "$p" || die "discovery"
done
for p in "${portals[@]}"; do
  check "login through $p" iscsiadm -m node -T "$TARGET_IQN" -p "$p" --login || die "login"
done

# sg_of PORT: the sg node of LUN 0 reached through the session to 127.0.0.1:PORT.
sg_of() {
  local lun hctl type sd sg session iface port
  while read -r lun hctl type sd sg session iface; do
    [[ $lun == 0 && $sg != - ]] || continue
    port=$(cat /sys/class/iscsi_session/"$session"/device/connection*/iscsi_connection/*/persistent_port 2>/dev/null | head -n 1)
    [[ $port == "$1" ]] && { echo "/dev/$sg"; return; }
  done < <(iscsi_devices)
}
end=$((SECONDS + 30))
while ((SECONDS < end)); do
  sg1=$(sg_of "${portals[0]##*:}") sg2=$(sg_of "${portals[1]##*:}")
  [[ -n $sg1 && -n $sg2 ]] && break
  sleep 0.2
done
iscsi_devices | sed 's/^/  /'
[[ -n $sg1 && -n $sg2 ]] || die "LUN 0 did not appear through both gateways"
declare -A NAME=([$sg1]="gateway 1" [$sg2]="gateway 2")
bs=$(block_size "$sg1"); bs=${bs:-512}
echo "LUN 0: $sg1 through gateway 1, $sg2 through gateway 2 (both $INITIATOR_IQN);" \
     "keys KA=$KA (gateway 1) KB=$KB (gateway 2); block size $bs, test LBA $lba"
for sg in "$sg1" "$sg2"; do sg_turs "$sg" >/dev/null 2>&1; sg_turs "$sg" >/dev/null 2>&1; done

# pr_out SG EXPECT ARGS...: sg_persist -n -o ARGS; EXPECT good or conflict (exit status 24).
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

# pr_in SG ARGS...: sg_persist -n -i ARGS; output in PR_IN.
pr_in() {
  local sg=$1 rc=0
  shift
  echo "\$ sg_persist -n -i $* $sg   # ${NAME[$sg]}"
  PR_IN=$(sg_persist -n -i "$@" "$sg" 2>&1) || rc=$?
  sed 's/^/    /' <<<"$PR_IN"
  ((rc == 0)) || fail "${NAME[$sg]}: sg_persist -i $*: exit status $rc"
  return "$rc"
}

# expect_keys SG GEN KEY...: READ KEYS lists exactly KEY... with PRGENERATION GEN.
expect_keys() {
  local sg=$1 gen=$2 got want g
  shift 2
  pr_in "$sg" -k || return
  got=$(grep -Eio '^ +0x[0-9a-f]+ *$' <<<"$PR_IN" | tr -d ' ' | tr 'A-F' 'a-f' | sort | tr '\n' ' ')
  want=$(printf '%s\n' "$@" | sed '/^$/d' | sort | tr '\n' ' ')
  if [[ $got == "$want" ]]; then echo "  registered keys: ${want:-none}, as expected"
  else fail "${NAME[$sg]}: READ KEYS: keys '${got% }', expected '${want% }'"; fi
  g=$(sed -n 's/.*PR generation=\(0x[0-9a-fA-F]*\).*/\1/p' <<<"$PR_IN" | head -1)
  if [[ -n $g ]] && ((g == gen)); then echo "  PRGENERATION $gen, as expected"
  else fail "${NAME[$sg]}: READ KEYS: PRGENERATION ${g:-?}, expected $gen"; fi
}

# expect_reservation SG KEY|none: READ RESERVATION shows KEY holding an LU_SCOPE Write
# Exclusive reservation, or none.
expect_reservation() {
  local sg=$1 key=$2 got
  pr_in "$sg" -r || return
  if [[ $key == none ]]; then
    grep -qi 'NO reservation held' <<<"$PR_IN" && echo "  no reservation, as expected" \
      || fail "${NAME[$sg]}: READ RESERVATION: a reservation is held, expected none"
    return
  fi
  got=$(sed -n 's/.*Key=\(0x[0-9a-fA-F]*\).*/\1/p' <<<"$PR_IN" | head -1 | tr 'A-F' 'a-f')
  [[ $got == "$key" ]] || fail "${NAME[$sg]}: READ RESERVATION: key '${got:-none}', expected $key"
  if grep -Eqi 'scope: *LU_SCOPE, *type: *Write Exclusive *$' <<<"$PR_IN"; then
    echo "  reservation: key $got, LU_SCOPE, Write Exclusive, as expected"
  else fail "${NAME[$sg]}: READ RESERVATION: not LU_SCOPE, Write Exclusive"; fi
}

# io SG read|write EXPECT [FILE]: one READ(10)/WRITE(10) of the block at $lba with sg_raw (no
# retries, the status as the target sent it); EXPECT good or conflict.
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

# holds SG FILE WHAT: the block at $lba read through SG equals FILE.
holds() {
  io "$1" read good
  cmp -s "$2" /tmp/read.bin && echo "  block $lba holds $3" || fail "block $lba does not hold $3"
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

for x in G1 G1b G2 G2b; do head -c "$bs" /dev/urandom >/tmp/$x.bin; done

step "1. fresh logical unit  [t=$(t)s]"
expect_keys "$sg1" 0
expect_keys "$sg2" 0
expect_reservation "$sg2" none

step "2. gateway 1: register $KA, reserve Write Exclusive  [t=$(t)s]"
pr_out "$sg1" good -G -S "$KA"
pr_out "$sg1" good -R -K "$KA" -T "$TYPE"
expect_keys "$sg2" 1 "$KA"
expect_reservation "$sg2" "$KA"

step "3. gateway 2's nexus, not registered, may read but not write  [t=$(t)s]"
io "$sg1" write good /tmp/G1.bin
io "$sg2" write conflict /tmp/G2.bin
io "$sg2" read good
cmp -s /tmp/G1.bin /tmp/read.bin && echo "  block $lba holds gateway 1's data, not gateway 2's" \
  || fail "block $lba does not hold gateway 1's data"

step "4. gateway 2: register $KB, preempt $KA  [t=$(t)s]"
pr_out "$sg2" good -G -S "$KB"
pr_out "$sg2" good -P -K "$KB" -S "$KA" -T "$TYPE"

step "5. gateway 1's nexus sees the preemption  [t=$(t)s]"
expect_ua "$sg1" "Registrations preempted"
expect_ua "$sg1" none
expect_ua "$sg2" none
expect_keys "$sg1" 3 "$KB"
expect_reservation "$sg1" "$KB"
io "$sg1" write conflict /tmp/G1b.bin
io "$sg2" write good /tmp/G2.bin
holds "$sg1" /tmp/G2.bin "gateway 2's data (gateway 1's write was refused)"

step "6. gateway 2 clears  [t=$(t)s]"
pr_out "$sg2" good -C -K "$KB"
expect_keys "$sg1" 4
expect_reservation "$sg1" none
io "$sg1" write good /tmp/G1b.bin
holds "$sg2" /tmp/G1b.bin "gateway 1's data (no reservation)"

step "logout  [t=$(t)s]"
logout_and_wait
errs=$(kernel_errors "$klog0" | grep -v 'reservation conflict' || true)
report_kernel_errors "$errs"
summary
