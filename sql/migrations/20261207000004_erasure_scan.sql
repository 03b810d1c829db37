-- The personal values an erasure request found in the log for its users, recorded before
-- their keys were destroyed, so that `feedloop erase verify` can look for them afterwards
-- (issue 20). Sealed (scan_values: nonce ‖ ciphertext of a JSON array) with the unattributed
-- key of their day named in scan_sealed_by, which the eraser destroys after
-- erasure.unattributed_retention_days: after that only values given to the command are
-- searched.
ALTER TABLE eraser.requests
    ADD COLUMN scan_values    bytea,
    ADD COLUMN scan_sealed_by text;
