-- OAuth accounts (claude-official, ChatGPT): when the access token expires (epoch ms, NULL when
-- unknown), when the relay last refreshed it, and why its last refresh failed. A refusal (the
-- provider turned the refresh token down) stops automatic refreshes until an operator stores
-- new tokens.
ALTER TABLE accounts ADD COLUMN token_expires_at BIGINT;
ALTER TABLE accounts ADD COLUMN token_refreshed_at BIGINT;
ALTER TABLE accounts ADD COLUMN token_refresh_error TEXT;
ALTER TABLE accounts ADD COLUMN token_refresh_refused BIGINT NOT NULL DEFAULT 0;
-- While a node refreshes an account's tokens it holds this lease (epoch ms): a refresh token is
-- single-use at the provider, so no other node sends it meanwhile.
ALTER TABLE accounts ADD COLUMN token_refresh_lease_until BIGINT;
