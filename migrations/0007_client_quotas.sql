-- Tidegate schema 7: per-client budgets, so one client's backlog holds back only itself.

-- How many events the notifier holds for this client at once (sent or waiting for its
-- endpoint); beyond it the rest waits in the callback outbox, in order. The default is
-- `tidegate.wire.DEFAULT_CALLBACK_HELD_MAX`.
ALTER TABLE clients ADD COLUMN IF NOT EXISTS callback_held_max integer NOT NULL DEFAULT 1000
    CONSTRAINT clients_callback_held_max_valid CHECK (callback_held_max BETWEEN 1 AND 1000000);
