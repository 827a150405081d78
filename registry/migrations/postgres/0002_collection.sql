-- Garbage collection, as ../0002_collection.sql.
ALTER TABLE blobs ADD COLUMN last_linked_at BIGINT NOT NULL DEFAULT 0;
UPDATE blobs SET last_linked_at = created_at;
CREATE INDEX blobs_by_last_link ON blobs (last_linked_at);
CREATE INDEX manifests_by_digest ON manifests (digest);

CREATE TABLE garbage (
    digest TEXT COLLATE "C" PRIMARY KEY,
    size BIGINT NOT NULL,
    sweeping SMALLINT NOT NULL DEFAULT 0,
    queued_at BIGINT NOT NULL
);
