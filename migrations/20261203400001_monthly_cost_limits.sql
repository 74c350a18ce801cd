-- Cost limits per UTC calendar month (billed micro-USD; NULL: no such limit), of a key and of a
-- user over all its keys, beside the daily and total ones.
ALTER TABLE api_keys ADD COLUMN monthly_cost_limit BIGINT;
ALTER TABLE users ADD COLUMN monthly_cost_limit BIGINT;
