"""What the device server, the copy manager and the front ends share: tasks and nexuses, sense,
CDB helpers, limits, range locks, policy flags and statistics slots."""
