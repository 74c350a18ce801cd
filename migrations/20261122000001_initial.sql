-- Initial schema of llm-relay. One dialect for SQLite and PostgreSQL: TEXT ids (uuid v7),
-- BIGINT for integers, booleans (0/1), epoch-millisecond timestamps and micro-USD money,
-- TEXT for JSON. Append-only: later changes go in new files.

CREATE TABLE users (
    id            TEXT   NOT NULL PRIMARY KEY,
    username      TEXT   NOT NULL UNIQUE,
    password_hash TEXT   NOT NULL,
    role          TEXT   NOT NULL CHECK (role IN ('admin', 'user')),
    enabled       BIGINT NOT NULL DEFAULT 1,
    price_rate    BIGINT NOT NULL DEFAULT 10000,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX idx_users_updated_at ON users (updated_at);

CREATE TABLE api_keys (
    id                TEXT   NOT NULL PRIMARY KEY,
    user_id           TEXT   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name              TEXT   NOT NULL,
    key_hash          TEXT   NOT NULL UNIQUE,
    key_prefix        TEXT   NOT NULL,
    enabled           BIGINT NOT NULL DEFAULT 1,
    expires_at        BIGINT,
    allowed_platforms TEXT   NOT NULL DEFAULT '[]',
    allowed_models    TEXT   NOT NULL DEFAULT '[]',
    rpm_limit         BIGINT,
    max_concurrency   BIGINT,
    daily_cost_limit  BIGINT,
    total_cost_limit  BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    last_used_at      BIGINT
);
CREATE INDEX idx_api_keys_user_id ON api_keys (user_id, created_at);
CREATE INDEX idx_api_keys_created_at ON api_keys (created_at);
CREATE INDEX idx_api_keys_updated_at ON api_keys (updated_at);

CREATE TABLE accounts (
    id                      TEXT   NOT NULL PRIMARY KEY,
    name                    TEXT   NOT NULL UNIQUE,
    account_type            TEXT   NOT NULL,
    base_url                TEXT,
    credential_enc          TEXT   NOT NULL,
    credential_key_id       TEXT   NOT NULL,
    refresh_token_enc       TEXT,
    priority                BIGINT NOT NULL DEFAULT 50,
    weight                  BIGINT NOT NULL DEFAULT 1,
    models                  TEXT   NOT NULL DEFAULT '[]',
    model_map               TEXT   NOT NULL DEFAULT '{}',
    max_concurrency         BIGINT,
    enabled                 BIGINT NOT NULL DEFAULT 1,
    status                  TEXT   NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'error', 'blocked')),
    consecutive_error_count BIGINT NOT NULL DEFAULT 0,
    cooldown_until          BIGINT,
    last_used_at            BIGINT,
    extra                   TEXT   NOT NULL DEFAULT '{}',
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL
);
CREATE INDEX idx_accounts_created_at ON accounts (created_at);
CREATE INDEX idx_accounts_updated_at ON accounts (updated_at);

CREATE TABLE model_prices (
    model          TEXT   NOT NULL PRIMARY KEY,
    input          BIGINT NOT NULL,
    output         BIGINT NOT NULL,
    cache_write_5m BIGINT,
    cache_write_1h BIGINT,
    cache_read     BIGINT,
    updated_at     BIGINT NOT NULL
);

-- No foreign keys: a record outlives the user, key or account it names, and must never be
-- refused because one of them was deleted while it sat in the writer's queue.
CREATE TABLE request_logs (
    id                    TEXT   NOT NULL PRIMARY KEY,
    created_at            BIGINT NOT NULL,
    user_id               TEXT,
    api_key_id            TEXT,
    account_id            TEXT,
    session_key           TEXT,
    protocol              TEXT   NOT NULL,
    requested_model       TEXT,
    upstream_model        TEXT,
    stream                BIGINT NOT NULL DEFAULT 0,
    status                BIGINT NOT NULL,
    input_tokens          BIGINT NOT NULL DEFAULT 0,
    output_tokens         BIGINT NOT NULL DEFAULT 0,
    cache_write_5m_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens     BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens      BIGINT NOT NULL DEFAULT 0,
    base_cost             BIGINT NOT NULL DEFAULT 0,
    billed_cost           BIGINT NOT NULL DEFAULT 0,
    price_rate            BIGINT NOT NULL DEFAULT 10000,
    latency_ms            BIGINT NOT NULL DEFAULT 0,
    ttfb_ms               BIGINT,
    failover_count        BIGINT NOT NULL DEFAULT 0,
    error_type            TEXT,
    unpriced              BIGINT NOT NULL DEFAULT 0,
    estimated             BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX idx_request_logs_created_at ON request_logs (created_at);
CREATE INDEX idx_request_logs_user ON request_logs (user_id, created_at);
CREATE INDEX idx_request_logs_api_key ON request_logs (api_key_id, created_at);
CREATE INDEX idx_request_logs_account ON request_logs (account_id, created_at);

CREATE TABLE usage_daily (
    day                TEXT   NOT NULL,
    dim                TEXT   NOT NULL,
    dim_id             TEXT   NOT NULL,
    requests           BIGINT NOT NULL DEFAULT 0,
    input_tokens       BIGINT NOT NULL DEFAULT 0,
    output_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens  BIGINT NOT NULL DEFAULT 0,
    base_cost          BIGINT NOT NULL DEFAULT 0,
    billed_cost        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, dim, dim_id)
);
-- Lookups by one entity over a range of days.
CREATE INDEX idx_usage_daily_dim ON usage_daily (dim, dim_id, day);

CREATE TABLE settings (
    key        TEXT   NOT NULL PRIMARY KEY,
    value      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id     TEXT   NOT NULL PRIMARY KEY,
    at     BIGINT NOT NULL,
    actor  TEXT   NOT NULL,
    action TEXT   NOT NULL,
    target TEXT   NOT NULL,
    detail TEXT   NOT NULL DEFAULT '{}'
);
CREATE INDEX idx_audit_log_at ON audit_log (at);

CREATE TABLE admin_sessions (
    token_hash TEXT   NOT NULL PRIMARY KEY,
    user_id    TEXT   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX idx_admin_sessions_expires_at ON admin_sessions (expires_at);
CREATE INDEX idx_admin_sessions_user_id ON admin_sessions (user_id);
