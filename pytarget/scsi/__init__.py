"""SCSI device server (SPC-4/SBC-3): opcode table, sense, command handlers, unit attentions."""
