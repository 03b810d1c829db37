-- cdc: which replication slots completed their initial snapshot. A slot whose snapshot was cut
-- short (a crash mid-snapshot) has no row here and is snapshotted again.
CREATE SCHEMA IF NOT EXISTS cdc;

CREATE TABLE cdc.snapshots (
    slot             text PRIMARY KEY,
    consistent_point text        NOT NULL,
    tables           integer     NOT NULL,
    rows             bigint      NOT NULL,
    completed_at     timestamptz NOT NULL DEFAULT now()
);
