-- Web searches the provider ran for the request (billed per search, apart from tokens).
ALTER TABLE request_logs ADD COLUMN web_search_requests BIGINT NOT NULL DEFAULT 0;
