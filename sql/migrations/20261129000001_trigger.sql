-- trigger: the catalogue of committed partition versions (from feedloop.datasets.partitions),
-- the decisions taken on them, and their deliveries to sinks.
CREATE SCHEMA IF NOT EXISTS trigger;

CREATE TABLE trigger.partitions (
    seq          bigserial PRIMARY KEY,          -- the pull API's cursor
    dataset      text NOT NULL,
    partition    text NOT NULL,
    version      int NOT NULL,
    manifest_uri text NOT NULL,
    row_count    bigint NOT NULL,
    -- What this version adds to the one it supersedes (negative after an erasure rewrite).
    added_rows   bigint NOT NULL,
    added_labels text NOT NULL,                  -- JSON {label: rows added}
    manifest     text NOT NULL,                  -- the manifest, JSON
    committed_at timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dataset, partition, version)
);
CREATE INDEX ON trigger.partitions (dataset, seq);

CREATE TABLE trigger.decisions (
    id           uuid PRIMARY KEY,               -- deterministic: dataset and the seq range covered
    dataset      text NOT NULL,
    rule         text NOT NULL,
    reason       text NOT NULL,
    from_seq     bigint NOT NULL,
    through_seq  bigint NOT NULL,
    label_counts text NOT NULL,                  -- JSON, the rows this trigger covers
    event        text NOT NULL,                  -- the CloudEvent, JSON
    decided_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON trigger.decisions (dataset, through_seq DESC);

CREATE TABLE trigger.deliveries (
    decision_id     uuid NOT NULL REFERENCES trigger.decisions (id),
    sink            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed')),
    attempts        int NOT NULL DEFAULT 0,
    last_error      text,
    leased_until    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (decision_id, sink)
);
CREATE INDEX ON trigger.deliveries (status) WHERE status IN ('pending', 'delivering');
