#!/bin/bash
# pr.sh - SPC-4 persistent reservations with sg_persist over three I_T nexuses, every outcome
# asserted.
#
#   linux-initiator run -p PORT -t IQN -f tests/interop/guest/common.sh tests/interop/guest/pr.sh
#
# Three iSCSI sessions to the target, one per open-iscsi iface, each with its own initiator
# name (so three I_T nexuses to the first disk LUN): A = iface default ($INITIATOR_IQN),
# B = iface prb (...-prb), C = iface prc (...-prc; never registers).  Data commands go through
# each session's own sg node (READ(10) / WRITE(10) of one block at PR_LBA with sg_raw), so the
# kernel neither retries nor hides a status.
#   1. fresh LU: no keys, no reservation; REPORT CAPABILITIES offers type 5
#   2. C (unregistered) RESERVE: RESERVATION CONFLICT (5.13.1: PR OUT other than REGISTER)
#   3. A registers KA, B registers KB: READ KEYS (from C) lists both, PRGENERATION + 2
#   4. A RESERVE type 5 (Write Exclusive - Registrants Only): READ RESERVATION (from C) shows
#      key KA, type 5, LU_SCOPE; PRGENERATION unchanged; READ FULL STATUS names both initiators
#   5. A (holder) and B (registrant) write, C (unregistered) gets RESERVATION CONFLICT on
#      WRITE but may READ; the block holds B's data, not C's
#   6. B PREEMPTs KA (type 5): READ KEYS = {KB}, READ RESERVATION = KB type 5, PRGENERATION + 1;
#      A's next command gets UNIT ATTENTION, REGISTRATIONS PREEMPTED (2Ah/05h) and B and C
#      get no unit attention; then A's WRITE conflicts, A's READ works, B writes;
#      A, now unregistered, gets RESERVATION CONFLICT for RELEASE, CLEAR and a REGISTER with
#      a non-zero RESERVATION KEY (5.13.11.2)
#   7. B CLEARs: no keys, no reservation, PRGENERATION + 1; A and C write again
# Environment: PR_LBA (2048).
. "$INTEROP_LIB"
. "$FILES_DIR/common.sh" || { echo "common.sh missing: pass it with -f"; exit 2; }
: "${TARGET_IQN:?pass the target IQN with -t}"
lba=${PR_LBA:-2048} KA=0xa1a1a1a1 KB=0xb2b2b2b2 TYPE=5
PR_TYPE_TEXT="Write Exclusive, registrants only"   # type 5, in sg_persist's words
klog0=$(dmesg_lines)

step "three sessions: ifaces default, prb, prc  [t=$(t)s]"
for i in prb prc; do
  check "iscsiadm iface $i" iscsiadm -m iface -I "$i" -o new >/dev/null
  check "iscsiadm iface $i initiatorname" \
    iscsiadm -m iface -I "$i" -o update -n iface.initiatorname -v "${INITIATOR_IQN}-$i" >/dev/null
done
check "discovery" iscsiadm -m discovery -t sendtargets -p "$TARGET_PORTAL" -I default -I prb -I prc \
  || die "discovery failed"
check "login" iscsiadm -m node -T "$TARGET_IQN" --login || die "login failed"
declare -A SG=() SD=()
end=$((SECONDS + 30))
while ((SECONDS < end)); do
  lun=$(disk_luns | awk '{ print $1 }')
  for i in default prb prc; do
    read -r sd sg <<<"$(iscsi_devices | awk -v l="$lun" -v f="$i" \
      '$1 == l && $3 == 0 && $4 != "-" && $5 != "-" && $7 == f { print $4, $5; exit }')"
    [[ -n $sg ]] && SG[$i]=/dev/$sg SD[$i]=/dev/$sd
  done
  [[ -n ${SG[default]:-} && -n ${SG[prb]:-} && -n ${SG[prc]:-} ]] && break
  sleep 0.2
done
udevadm settle --timeout=10 2>/dev/null
iscsi_devices | sed 's/^/  /'
[[ -n ${SG[default]:-} && -n ${SG[prb]:-} && -n ${SG[prc]:-} ]] \
  || die "LUN ${lun:-?} did not appear on all three sessions"
sgA=${SG[default]} sgB=${SG[prb]} sgC=${SG[prc]}
declare -A NAME=([$sgA]=A [$sgB]=B [$sgC]=C)
bs=$(block_size "$sgA"); bs=${bs:-512}
echo "LUN $lun: A = $sgA (${INITIATOR_IQN}), B = $sgB (${INITIATOR_IQN}-prb)," \
     "C = $sgC (${INITIATOR_IQN}-prc); keys A=$KA B=$KB; block size $bs, test LBA $lba"
# every session must have consumed its login unit attention before the checks start
for sg in "$sgA" "$sgB" "$sgC"; do sg_turs "$sg" >/dev/null 2>&1; sg_turs "$sg" >/dev/null 2>&1; done

for x in A B C A2 B2 C2 C3; do head -c "$bs" /dev/urandom >/tmp/$x.bin; done

# ------------------------------------------------------------------------ 1.
step "1. fresh logical unit  [t=$(t)s]"
pr_in "$sgA" -k && g0=$(pr_generation)
g0=$((${g0:-0}))
expect_keys "$sgA" "$g0"
expect_reservation "$sgA" none
pr_in "$sgA" -c && {
  grep -qi 'Write Exclusive, registrants only: 1' <<<"$PR_IN" \
    || fail "REPORT CAPABILITIES: type 5 (Write Exclusive, registrants only) not in the type mask"
}
io "$sgC" write good /tmp/C.bin
holds "$sgC" /tmp/C.bin "C's data (no reservation yet)"

# ------------------------------------------------------------------------ 2.
step "2. unregistered C may not reserve  [t=$(t)s]"
pr_out "$sgC" conflict -R -K "$KA" -T "$TYPE"
expect_reservation "$sgC" none

# ------------------------------------------------------------------------ 3.
step "3. A registers $KA, B registers $KB  [t=$(t)s]"
pr_out "$sgA" good -G -S "$KA"
pr_out "$sgB" good -G -S "$KB"
expect_keys "$sgC" $((g0 + 2)) "$KA" "$KB"

# ------------------------------------------------------------------------ 4.
step "4. A reserves, type $TYPE (Write Exclusive - Registrants Only)  [t=$(t)s]"
pr_out "$sgA" good -R -K "$KA" -T "$TYPE"
expect_reservation "$sgC" "$KA"
expect_keys "$sgB" $((g0 + 2)) "$KA" "$KB"
if pr_in "$sgA" -s; then
  for n in "${INITIATOR_IQN}" "${INITIATOR_IQN}-prb"; do
    grep -qiF "$n," <<<"$PR_IN" || fail "READ FULL STATUS does not name initiator port $n,i,0x..."
  done
  grep -qiF "${INITIATOR_IQN}-prc" <<<"$PR_IN" && fail "READ FULL STATUS names C, which never registered"
  holders=$(awk '/Key=0x/ { k = tolower($1); sub(".*key=", "", k) } /<< *Reservation holder *>>/ { print k }' <<<"$PR_IN")
  if [[ $holders == "$KA" ]]; then echo "  READ FULL STATUS: $KA (A) is the only reservation holder"
  else fail "READ FULL STATUS: reservation holder(s) '${holders//$'\n'/ }', expected $KA only"; fi
fi

# ------------------------------------------------------------------------ 5.
step "5. under the reservation: A and B write, C only reads  [t=$(t)s]"
io "$sgA" write good /tmp/A.bin
holds "$sgC" /tmp/A.bin "A's data"
io "$sgB" write good /tmp/B.bin
holds "$sgC" /tmp/B.bin "B's data (registrants may write)"
io "$sgC" write conflict /tmp/C2.bin
io "$sgC" read good
holds "$sgC" /tmp/B.bin "B's data (C's write was refused)"

# ------------------------------------------------------------------------ 6.
step "6. B preempts A's key  [t=$(t)s]"
pr_out "$sgB" good -P -K "$KB" -S "$KA" -T "$TYPE"
expect_keys "$sgB" $((g0 + 3)) "$KB"
expect_reservation "$sgB" "$KB"
expect_ua "$sgB" none
expect_ua "$sgC" none
expect_ua "$sgA" "Registrations preempted"
io "$sgA" write conflict /tmp/A2.bin
io "$sgA" read good
holds "$sgC" /tmp/B.bin "B's data (A's write was refused)"
io "$sgB" write good /tmp/B2.bin
holds "$sgC" /tmp/B2.bin "B's second data (B holds the reservation)"
io "$sgC" write conflict /tmp/C2.bin
pr_out "$sgA" conflict -L -K "$KA" -T "$TYPE"
pr_out "$sgA" conflict -C -K "$KA"
pr_out "$sgA" conflict -G -K "$KA" -S "$KA"
expect_keys "$sgC" $((g0 + 3)) "$KB"

# ------------------------------------------------------------------------ 7.
step "7. B clears  [t=$(t)s]"
pr_out "$sgB" good -C -K "$KB"
expect_keys "$sgA" $((g0 + 4))
expect_reservation "$sgA" none
expect_ua "$sgC" none
io "$sgC" write good /tmp/C3.bin
holds "$sgC" /tmp/C3.bin "C's data (no reservation)"
io "$sgA" write good /tmp/A2.bin
holds "$sgC" /tmp/A2.bin "A's data (no reservation)"

step "logout  [t=$(t)s]"
logout_and_wait
errs=$(kernel_errors "$klog0" | grep -v 'reservation conflict' || true)
report_kernel_errors "$errs"
summary
