-- Tidegate schema 2: callback batching per client, and the outbox's per-client order.

-- How many callbacks a client takes in one request (a JSON array); 1 means one JSON object
-- per request, the shape every client understands.
ALTER TABLE clients ADD COLUMN callback_batch_max integer NOT NULL DEFAULT 1
    CONSTRAINT clients_callback_batch_max_valid CHECK (callback_batch_max BETWEEN 1 AND 1000);

-- The retry job reads one client's rows in id order (delivery order) and finds each client's
-- oldest row; without this every pass would sort the whole outbox.
CREATE INDEX callback_outbox_client_idx ON callback_outbox (client, id);
