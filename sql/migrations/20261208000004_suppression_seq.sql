-- The order in which users were suppressed. The eraser inserts under the exclusive suppression
-- lock, so seq order is commit order: a labeler with local join state purges the users above
-- its positions.suppression_through at its next commit (which writes a snapshot without
-- them), and the eraser waits until every such dataset is past the request's users.
ALTER TABLE collector.suppressed_users ADD COLUMN seq bigserial;
CREATE UNIQUE INDEX suppressed_users_by_seq ON collector.suppressed_users (seq);
ALTER TABLE labeler.positions ADD COLUMN suppression_through bigint NOT NULL DEFAULT 0;
