-- Tidegate schema 10: a client's own buffer quota.

-- How many of this client's tasks may wait (submitted and not routed, plus routed and not
-- dispatched) before its submissions are refused with `BufferFull`. NULL: the stream-wide
-- TIDEGATE_CLIENT_BUFFER_MAX, per buffer, which also stays the hard ceiling: a larger value
-- here is held at it (`tidegate client set NAME --buffer-max N` refuses one).
ALTER TABLE clients ADD COLUMN IF NOT EXISTS buffer_max integer
    CONSTRAINT clients_buffer_max_valid CHECK (buffer_max IS NULL OR buffer_max >= 1);
