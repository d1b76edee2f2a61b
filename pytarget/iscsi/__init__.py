"""iSCSI (RFC 7143): PDU codec, login and text negotiation, sans-I/O connection and session."""
