-- The demo product database that cdc captures: the video-chat app's own tables.
-- Personal data (email, phone) lives here and only here; feedloop's events carry
-- pseudonymous user ids.
CREATE SCHEMA IF NOT EXISTS app;

CREATE TABLE IF NOT EXISTS app.users (
    id           text PRIMARY KEY,
    email        text NOT NULL,
    phone        text,
    display_name text NOT NULL,
    country      text,
    bio          text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
-- Old rows in full, so that setting deleted_at is recognisable in the change stream.
ALTER TABLE app.users REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS app.matches (
    id         uuid PRIMARY KEY,
    user_a     text NOT NULL,
    user_b     text NOT NULL,
    status     text NOT NULL DEFAULT 'proposed',
    score      double precision,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS app.blocks (
    id         bigserial PRIMARY KEY,
    blocker_id text NOT NULL,
    blocked_id text NOT NULL,
    match_id   uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS app.reports (
    id          bigserial PRIMARY KEY,
    reporter_id text NOT NULL,
    reported_id text NOT NULL,
    match_id    uuid,
    reason      text NOT NULL,
    comment     text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox: rows written in the same transaction as the change they announce;
-- cdc routes them to outbox.<aggregate_type>.
CREATE TABLE IF NOT EXISTS app.outbox (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    type           text NOT NULL,
    payload        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
