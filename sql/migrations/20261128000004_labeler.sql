-- labeler: join state (the Postgres StateStore adapter), consumer positions committed with the
-- datasets they produced, dataset partition manifests, and the per-user partition index the
-- eraser uses.
CREATE SCHEMA IF NOT EXISTS labeler;

-- Erasure purges (rare) scan these tables by `users`; indexing every insert for them cost more
-- than the scans.
-- Impressions waiting for their windows to close (and, with late_outcomes = "correct", for
-- corrections until the horizon). payload: the impression as JSON.
CREATE TABLE labeler.impressions (
    dataset    text   NOT NULL,
    example_id uuid   NOT NULL,
    close_ms   bigint NOT NULL,
    keys       text[] NOT NULL,
    users      text[] NOT NULL,
    payload    bytea  NOT NULL,
    PRIMARY KEY (dataset, example_id)
);
CREATE INDEX impressions_by_close ON labeler.impressions (dataset, close_ms, example_id);
CREATE INDEX impressions_by_key ON labeler.impressions USING gin (keys);

-- Outcomes waiting for impressions. payload: the outcome as JSON.
CREATE TABLE labeler.outcomes (
    dataset    text   NOT NULL,
    join_key   text   NOT NULL,
    name       text   NOT NULL,
    outcome_id text   NOT NULL,
    time_ms    bigint NOT NULL,
    users      text[] NOT NULL,
    payload    bytea  NOT NULL,
    PRIMARY KEY (dataset, join_key, name, outcome_id)
);
CREATE INDEX outcomes_by_time ON labeler.outcomes (dataset, time_ms);

-- Where each dataset's labeler is in the log: written in the same transaction as the
-- manifests of the rows it produced.
CREATE TABLE labeler.positions (
    dataset        text        PRIMARY KEY,
    spec_hash      text        NOT NULL,
    seq            bigint      NOT NULL,
    -- {"topic/partition": next offset to read}
    offsets        text        NOT NULL,
    -- {"topic/partition": highest event time read}
    watermarks     text        NOT NULL,
    -- Examples were emitted up to this (close time, example id).
    emitted_through_ms bigint  NOT NULL,
    emitted_through_id uuid    NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now()
);

-- Every version of every dataset partition (dt=YYYY-MM-DD/hour=HH). The highest version is the
-- current one; manifest is the JSON written next to the files.
CREATE TABLE labeler.partitions (
    dataset        text        NOT NULL,
    partition      text        NOT NULL,
    version        integer     NOT NULL,
    manifest_uri   text        NOT NULL,
    manifest       text        NOT NULL,
    row_count      bigint      NOT NULL,
    byte_size      bigint      NOT NULL,
    erasure_epoch  bigint      NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now(),
    -- Set once the manifest was announced on feedloop.datasets.partitions.
    published_at   timestamptz,
    PRIMARY KEY (dataset, partition, version)
);
CREATE INDEX partitions_unpublished ON labeler.partitions (committed_at) WHERE published_at IS NULL;

-- Which partitions hold rows about which user (viewer or candidate): the eraser rewrites only
-- these.
CREATE TABLE labeler.partition_users (
    dataset   text NOT NULL,
    user_id   text NOT NULL,
    partition text NOT NULL,
    PRIMARY KEY (user_id, dataset, partition)
);

-- Bumped by each erasure that rewrites datasets; manifests record the epoch they were
-- written under.
CREATE TABLE labeler.erasure_epochs (
    dataset text   PRIMARY KEY,
    epoch   bigint NOT NULL
);
