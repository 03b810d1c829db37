-- The emission outbox holds a compact binary encoding (one 37-byte entry per emitted example
-- version, see the labeler's `encode_emissions`), which does not compress: store it without
-- trying to.
ALTER TABLE labeler.emission_outbox ALTER COLUMN emissions SET STORAGE EXTERNAL;
