-- Micro-USD per web search the provider ran (NULL: searches are not billed).
ALTER TABLE model_prices ADD COLUMN web_search BIGINT;
