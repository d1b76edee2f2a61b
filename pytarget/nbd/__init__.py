"""The NBD front end: wire format, sans-I/O connection, exports, and the glue to the device
server."""
