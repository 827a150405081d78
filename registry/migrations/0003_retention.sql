-- Retention. When the manifest was last served to a GET in its repository (unix seconds, 0 for
-- never). Written by coalesced batches of recorded pulls, so a pull itself never writes.
ALTER TABLE manifests ADD COLUMN last_pulled_at BIGINT NOT NULL DEFAULT 0;
-- Retention lists tags by repository prefix and age.
CREATE INDEX tags_by_manifest ON tags (repository_id, manifest_digest);
