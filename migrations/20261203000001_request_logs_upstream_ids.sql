-- The ids the provider gave the request: from its answer's head (Anthropic `request-id`,
-- OpenAI `x-request-id`) and from its body (the message, completion or response id). NULL
-- when it gave none.
ALTER TABLE request_logs ADD COLUMN upstream_request_id TEXT;
ALTER TABLE request_logs ADD COLUMN response_id TEXT;
