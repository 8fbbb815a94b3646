"""The tamper-evident audit log: encrypted, hash-chained JSON lines (hook plugin ``audit``)."""
