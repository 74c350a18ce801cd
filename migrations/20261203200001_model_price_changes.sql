-- Price overrides an admin scheduled ahead: the model's override from `from_ms` (epoch ms) on,
-- columns as in model_prices. The override in effect at a time is the latest of these that has
-- begun, else the model's row in model_prices. Kept apart from model_prices so nodes of an
-- earlier version, which know that table only, go on reading and writing it as before.
CREATE TABLE model_price_changes (
    model          TEXT   NOT NULL,
    from_ms        BIGINT NOT NULL,
    input          BIGINT NOT NULL,
    output         BIGINT NOT NULL,
    cache_write_5m BIGINT,
    cache_write_1h BIGINT,
    cache_read     BIGINT,
    web_search     BIGINT,
    long_context   TEXT,
    priority       TEXT,
    flex           TEXT,
    fast           TEXT,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (model, from_ms)
);
