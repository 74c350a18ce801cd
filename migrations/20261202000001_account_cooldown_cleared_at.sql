-- When an operator last ended the account's cooldown (epoch ms; NULL: never). Every node drops
-- the cooldown it holds in memory when it sees this move, which a cleared `cooldown_until`
-- alone cannot tell it (nodes only ever raise a cooldown from the stored one).
ALTER TABLE accounts ADD COLUMN cooldown_cleared_at BIGINT;
