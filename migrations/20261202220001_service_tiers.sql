-- The service tier the provider says it served a request at ('priority', 'flex',
-- 'standard'); NULL when the answer named none.
ALTER TABLE request_logs ADD COLUMN service_tier TEXT;
-- A price override's cards for the priority and flex tiers, as model_prices.long_context:
-- JSON ({"input", "output", "cache_write_5m"?, "cache_write_1h"?, "cache_read"?}), 'none', or
-- NULL to keep the shipped card.
ALTER TABLE model_prices ADD COLUMN priority TEXT;
ALTER TABLE model_prices ADD COLUMN flex TEXT;
