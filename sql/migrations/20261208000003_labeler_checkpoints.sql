-- Local join state (state.store = "local") is made durable by checkpoints: segments of the
-- state under <root>/_state/<dataset>/, listed here ({"segments": [{"path", "sha256", "rows"}]})
-- and committed with the offsets they cover. NULL: the state is in a shared store (Postgres,
-- ScyllaDB).
ALTER TABLE labeler.positions ADD COLUMN checkpoint text;
