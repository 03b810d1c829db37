-- Versions of examples (issue 19): what the last committed version of each example said, so
-- that a correction that says the same creates no version and versions stay consecutive.
-- JSON {"version": n, "digest": d, "label": "..."}; NULL until a version is committed.
ALTER TABLE labeler.impressions ADD COLUMN emitted bytea;

-- Each commit's emitted versions, written in the commit's transaction and applied to the join
-- state (which may live in ScyllaDB) right after it; a crash in between is caught up at the
-- next start. JSON array of {"example_id", "close_ms", "emission"}.
CREATE TABLE labeler.emission_outbox (
    dataset   text   NOT NULL,
    seq       bigint NOT NULL,
    emissions bytea  NOT NULL,
    PRIMARY KEY (dataset, seq)
);

-- Late impressions waiting for the outcomes that came with them ([{"example_id", "match_id",
-- "topic", "partition", "release_at"}]), and the dataset's late-data counters
-- ({"outcomes_corrected": n, ...}); both committed with the offsets.
ALTER TABLE labeler.positions
    ADD COLUMN held text NOT NULL DEFAULT '[]',
    ADD COLUMN late text NOT NULL DEFAULT '{}';
