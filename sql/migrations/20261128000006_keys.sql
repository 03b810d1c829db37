-- Per-user data keys for crypto-shredding: personal fields in the log are sealed with the key
-- of their user; erasure deletes the key, and the sealed copies become unreadable everywhere.
CREATE SCHEMA IF NOT EXISTS keys;

CREATE TABLE keys.user_keys (
    user_id    text        PRIMARY KEY,
    key        bytea       NOT NULL CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
