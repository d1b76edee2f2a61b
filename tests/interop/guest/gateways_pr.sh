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
PR_TYPE_TEXT="Write Exclusive"   # type 1, in sg_persist's words
klog0=$(dmesg_lines)

step "discovery through each gateway, one login each (${portals[*]})  [t=$(t)s]"
discover_each
login_each

end=$((SECONDS + 30))
while ((SECONDS < end)); do
  sg1=$(lun0_via "${portals[0]##*:}" sg) sg2=$(lun0_via "${portals[1]##*:}" sg)
  [[ -n $sg1 && -n $sg2 ]] && break
  sleep 0.2
done
iscsi_devices | sed 's/^/  /'
[[ -n $sg1 && -n $sg2 ]] || die "LUN 0 did not appear through both gateways"
sg1=/dev/$sg1 sg2=/dev/$sg2
declare -A NAME=([$sg1]="gateway 1" [$sg2]="gateway 2")
bs=$(block_size "$sg1"); bs=${bs:-512}
echo "LUN 0: $sg1 through gateway 1, $sg2 through gateway 2 (both $INITIATOR_IQN);" \
     "keys KA=$KA (gateway 1) KB=$KB (gateway 2); block size $bs, test LBA $lba"
for sg in "$sg1" "$sg2"; do sg_turs "$sg" >/dev/null 2>&1; sg_turs "$sg" >/dev/null 2>&1; done

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
