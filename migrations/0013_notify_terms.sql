-- Tidegate schema 13: notifier terms, the database's side of the notifier lease.

-- One row per notifier partition: the lease revision (a JetStream KV revision, which only
-- grows) of the holder whose term began last. A holder writes it when its term begins, before
-- it sends anything, and every outbox write of a holder checks it under a share lock in the
-- same transaction: a holder that lost its lease (frozen, cut off) and wakes up mid-write
-- cannot add rows behind its successor's, which the retry job would then send after newer
-- states (fencing by lease revision). The successor's write waits for such a write in flight
-- and then sees its rows.
CREATE TABLE IF NOT EXISTS notify_terms (
    partition integer PRIMARY KEY,
    revision bigint NOT NULL,
    holder text NOT NULL,
    began_at timestamptz NOT NULL DEFAULT now()
);
