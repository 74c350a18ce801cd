-- A price override's card for Anthropic's fast mode, as model_prices.priority: JSON, 'none',
-- or NULL to keep the shipped card.
ALTER TABLE model_prices ADD COLUMN fast TEXT;
