-- Cost limits of a user over all its keys (billed micro-USD; NULL: no such limit): per UTC day
-- and in total. Keys' own limits only restrict them further.
ALTER TABLE users ADD COLUMN daily_cost_limit BIGINT;
ALTER TABLE users ADD COLUMN total_cost_limit BIGINT;
-- Set when an admin disabled the key (cleared when an admin enables it): its owner cannot
-- enable it again.
ALTER TABLE api_keys ADD COLUMN disabled_by_admin BIGINT NOT NULL DEFAULT 0;
