-- Platforms and models (exact or `*` / `?` globs) a user's keys may use, as JSON arrays; empty:
-- all. A key's own lists only restrict it further, so keys a tenant makes itself hold to them.
ALTER TABLE users ADD COLUMN allowed_platforms TEXT NOT NULL DEFAULT '[]';
ALTER TABLE users ADD COLUMN allowed_models TEXT NOT NULL DEFAULT '[]';
