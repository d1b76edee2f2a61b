"""State that the gateways serving one logical unit share through the Ceph cluster."""
