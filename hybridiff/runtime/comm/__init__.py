"""Moving bytes between ranks: transports, shared memory, process groups. This file stays
standard library only: the launcher reads it without importing torch."""

#: Set by the local launcher: the file store through which its workers join their process
#: group (so no store listens on the network).
STORE_ENV = "HYBRIDIFF_STORE_FILE"
