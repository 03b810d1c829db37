-- Envelope encryption (issue 20): data keys are stored wrapped by a key-encryption key that
-- lives outside the database (keys.kek / keys.kek_file), with the id of that KEK, so that a
-- copy of this database alone never yields a usable key. Keys stored before this (in `key`)
-- are re-wrapped by the eraser at start (KeyStore::rewrap), which clears `key`.
-- Destruction deletes the wrapped key; the row stays (destroyed_at set) so that no key is ever
-- made again for the user.
ALTER TABLE keys.user_keys
    ADD COLUMN wrapped bytea CHECK (length(wrapped) = 72),
    ADD COLUMN kek_id  text,
    ADD CONSTRAINT user_keys_wrapped_with_kek CHECK ((wrapped IS NULL) = (kek_id IS NULL));
