"""The pure core: specs, log records and the transaction state machine."""
