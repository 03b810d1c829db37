-- Per-user data keys for crypto-shredding: personal fields in the log are sealed with the key
-- of their user; erasure deletes the key, and the sealed copies become unreadable everywhere.
CREATE SCHEMA IF NOT EXISTS keys;

-- A destroyed key leaves its row with key NULL, so that a later change about the same user is
-- never sealed with a fresh key (which would make it readable again).
CREATE TABLE keys.user_keys (
    user_id      text        PRIMARY KEY,
    key          bytea       CHECK (length(key) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz
);
