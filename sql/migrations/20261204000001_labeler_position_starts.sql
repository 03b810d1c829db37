-- The first record of each input partition's log, as the labeler read it from the start:
-- {"topic/partition": [offset, timestamp ms]}, committed with the offsets. A restarted labeler
-- reads it again: a log that holds another record there (or none) was lost and started again
-- (a broker that lost its state, a topic deleted and created again), and is read from its
-- start instead of from the committed offset, which would skip its first records.
ALTER TABLE labeler.positions
    ADD COLUMN starts text NOT NULL DEFAULT '{}';
