-- Garbage collection, as ../0002_collection.sql.
ALTER TABLE blobs ADD COLUMN last_linked_at BIGINT NOT NULL DEFAULT 0;
UPDATE blobs SET last_linked_at = created_at;
CREATE INDEX blobs_by_last_link ON blobs (last_linked_at);
CREATE INDEX manifests_by_digest ON manifests (digest);

CREATE TABLE garbage (
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    size BIGINT NOT NULL,
    sweeping SMALLINT NOT NULL DEFAULT 0,
    queued_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
