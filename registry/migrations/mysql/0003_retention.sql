-- Retention, as ../0003_retention.sql.
ALTER TABLE manifests ADD COLUMN last_pulled_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tags_by_manifest ON tags (repository_id, manifest_digest);
