#!/bin/sh
# kt-connect's shadow image (kt-connect-shadow) as the testbed runs it: what its entrypoint
# does, with the programs of this machine. Root may log in over SSH with the public key that
# kt-connect's ktctl puts in the ConfigMap mounted at /root/authorized; when KT_DNS_PROTOCOL is
# set, a DNS server on port 53 answers from the cluster's DNS (kt-connect's own shadow binary
# does that; here CoreDNS forwards to the pod's resolv.conf).
set -eu
echo "Initializing ..."
env | grep '^KT_' || true
mkdir -p /root/.ssh /run/sshd
cp /root/authorized/authorized_keys /root/.ssh/authorized_keys
chmod 700 /root/.ssh
chmod 600 /root/.ssh/authorized_keys
keys=$(mktemp -d)
ssh-keygen -q -t ecdsa -b 256 -N '' -f "$keys/ssh_host_ecdsa_key"
if [ -n "${KT_DNS_PROTOCOL:-}" ]; then
  corefile="$keys/Corefile"
  printf '.:53 {\n  forward . /etc/resolv.conf\n}\n' > "$corefile"
  echo "Run shadow DNS ($KT_DNS_PROTOCOL) on port 53"
  "$KT_CLUSTER_BIN" coredns -conf "$corefile" &
fi
exec /usr/sbin/sshd -D -e -f "$SSHD_CONFIG" -h "$keys/ssh_host_ecdsa_key"
