-- Background work that must run on one instance at a time (collection, retention, the purge of
-- idle uploads) runs while its instance holds the lease of that name; a holder that dies loses it
-- when it expires.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
