-- eraser: erasure requests, the state of each target, every transition, and the audit
-- certificate of completed requests.
CREATE SCHEMA IF NOT EXISTS eraser;

CREATE TABLE eraser.requests (
    id              uuid        PRIMARY KEY,
    idempotency_key text        UNIQUE,
    user_ids        text[]      NOT NULL,
    reason          text        NOT NULL,
    requested_by    text        NOT NULL,
    origin          text        NOT NULL,
    -- pending | running | completed | partially_failed
    status          text        NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    deadline_at     timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    -- JSON audit certificate, once completed (user ids only as keyed hashes).
    certificate     text
);
CREATE INDEX requests_open ON eraser.requests (requested_at) WHERE status IN ('pending', 'running');
CREATE INDEX requests_users ON eraser.requests USING gin (user_ids);

CREATE TABLE eraser.targets (
    request_id  uuid        NOT NULL REFERENCES eraser.requests (id),
    target      text        NOT NULL,
    -- pending | running | completed | failed
    status      text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    affected    bigint      NOT NULL DEFAULT 0,
    -- JSON: target-specific counts and, for datasets, the manifests changed.
    details     text        NOT NULL DEFAULT '{}',
    error       text,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (request_id, target)
);

CREATE TABLE eraser.transitions (
    id          bigserial   PRIMARY KEY,
    request_id  uuid        NOT NULL REFERENCES eraser.requests (id),
    target      text,
    from_status text,
    to_status   text        NOT NULL,
    detail      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transitions_by_request ON eraser.transitions (request_id, id);
