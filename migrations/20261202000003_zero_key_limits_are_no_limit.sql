-- An rpm or concurrency limit of 0 always meant "no limit" to the relay; the admin API now
-- refuses 0 and takes NULL for none, so stored zeros say so too.
UPDATE api_keys SET rpm_limit = NULL WHERE rpm_limit = 0;
UPDATE api_keys SET max_concurrency = NULL WHERE max_concurrency = 0;
