"""Client callbacks: the payload, its transports (HTTP webhook, NATS request), the retry outbox.

The notifier sends a callback once, straight from the event; only a failed send is written to
Postgres (`Outbox.enqueue`), and `retry_pass` drains that outbox from any number of drivers.
"""
