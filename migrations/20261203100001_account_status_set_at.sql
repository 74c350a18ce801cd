-- When an operator last set the account's status or replaced its credential (epoch ms; NULL:
-- never). A status the proxy observed before then (auth errors taking the account out, a
-- success putting it back) is not stored after it: the operator's word came later.
ALTER TABLE accounts ADD COLUMN status_set_at BIGINT;
