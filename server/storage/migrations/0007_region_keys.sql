-- A destination whose region key was shredded (nothing is sent there until the primary has a
-- new key), the key the primary learned after a rekey (the region node's signed statement;
-- NULL: the config's public_key file), and where re-sending every copy under the new key has
-- got to (the last user id sent; NULL: not re-sending).
ALTER TABLE destination_state ADD COLUMN key_shredded TEXT NOT NULL DEFAULT '';
ALTER TABLE destination_state ADD COLUMN region_key BLOB;
ALTER TABLE destination_state ADD COLUMN resend_after TEXT;
