"""Tidegate's shared core: wire messages, NATS names, the Postgres store, and the driver."""
