-- The record id is always made by the relay; the client's own x-request-id, when it sent one,
-- is kept beside it (it is neither unique nor trusted).
ALTER TABLE request_logs ADD COLUMN request_id TEXT;
