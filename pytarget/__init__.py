"""pytarget: a userspace iSCSI target with an SPC-4/SBC-3 device server and copy offload."""

__version__ = "0.1.0"
