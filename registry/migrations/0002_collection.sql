-- Garbage collection. When a blob was last given to a repository (pushed or mounted): a blob no
-- manifest references is collected only once this is older than the grace period.
ALTER TABLE blobs ADD COLUMN last_linked_at BIGINT NOT NULL DEFAULT 0;
UPDATE blobs SET last_linked_at = created_at;
CREATE INDEX blobs_by_last_link ON blobs (last_linked_at);
CREATE INDEX manifests_by_digest ON manifests (digest);

-- Content whose bytes are to be deleted: nothing references it and no repository can read it
-- any more (its rows and links went in the same transaction as its row here). Writing the same
-- digest again takes it back while `sweeping` is 0; once a sweep has set it, writers wait for the
-- sweep to finish and write the bytes anew.
CREATE TABLE garbage (
    digest TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    sweeping INTEGER NOT NULL DEFAULT 0,
    queued_at BIGINT NOT NULL
);
