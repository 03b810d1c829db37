-- What the last committed version of each example said, in a narrow table of its own. It was a
-- column of labeler.impressions: writing it after every commit updated the wide impression row
-- (payload and GIN-indexed arrays), so Postgres wrote a new version of the row and of every
-- index entry it has, per emitted example.
CREATE TABLE labeler.emissions (
    dataset    text   NOT NULL,
    example_id uuid   NOT NULL,
    close_ms   bigint NOT NULL,
    emitted    bytea  NOT NULL,
    PRIMARY KEY (dataset, example_id)
);
CREATE INDEX emissions_by_close ON labeler.emissions (dataset, close_ms);

INSERT INTO labeler.emissions (dataset, example_id, close_ms, emitted)
    SELECT dataset, example_id, close_ms, emitted FROM labeler.impressions WHERE emitted IS NOT NULL;
ALTER TABLE labeler.impressions DROP COLUMN emitted;
