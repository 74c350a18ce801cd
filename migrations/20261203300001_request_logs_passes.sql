-- The passes a request ran on other models than its own (an advisor's sub-inferences), as a
-- JSON array of {"model", "input_tokens", "output_tokens", "cache_write_5m_tokens",
-- "cache_write_1h_tokens", "cache_read_tokens"}: their tokens are in the record's costs, not in
-- its token columns (which count its own model's). NULL: none.
ALTER TABLE request_logs ADD COLUMN passes TEXT;
