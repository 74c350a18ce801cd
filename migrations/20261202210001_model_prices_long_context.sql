-- The long-context rate card of a price override, as JSON
-- ({"above_tokens", "input", "output", "cache_write_5m"?, "cache_write_1h"?, "cache_read"?}),
-- 'none' for one price at every prompt length, NULL to keep the shipped card.
ALTER TABLE model_prices ADD COLUMN long_context TEXT;
