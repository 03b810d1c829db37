-- The timestamp of the last record read in each input partition, committed with the offsets.
-- A restart reads that record again first: if the log no longer holds it at that offset, the
-- log was replaced (a broker that lost its state, a topic deleted and created again), and the
-- labeler reports it and reads the new log from its start instead of skipping into it.
ALTER TABLE labeler.positions
    ADD COLUMN timestamps text NOT NULL DEFAULT '{}'; -- {"topic/partition": ms}
