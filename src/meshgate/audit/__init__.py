"""The audit log: every request through a gateway or sidecar, allowed or refused, as one record."""
