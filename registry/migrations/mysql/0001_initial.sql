-- MySQL 8 / MariaDB twin of ../0001_initial.sql (same tables, columns and meaning). Names, tags
-- and digests are ASCII (their grammars allow nothing else): stored as ascii_bin they compare and
-- sort byte by byte as in SQLite, and a key of them stays within InnoDB's 3072-byte index limit.
-- Inline column REFERENCES are ignored by InnoDB, so foreign keys are table constraints.
CREATE TABLE repositories (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Every blob committed to content storage, whoever owns it.
CREATE TABLE blobs (
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- A repository can read a blob only through a row here (pushed or mounted into it).
CREATE TABLE repository_blobs (
    repository_id BIGINT NOT NULL,
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, digest),
    FOREIGN KEY (repository_id) REFERENCES repositories (id) ON DELETE CASCADE,
    FOREIGN KEY (digest) REFERENCES blobs (digest)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX repository_blobs_by_digest ON repository_blobs (digest);

CREATE TABLE manifests (
    repository_id BIGINT NOT NULL,
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    media_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    artifact_type TEXT,
    subject VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin,
    annotations MEDIUMTEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, digest),
    FOREIGN KEY (repository_id) REFERENCES repositories (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX manifests_by_subject ON manifests (repository_id, subject);

-- What each manifest needs: its blobs, or for an index its child manifests.
CREATE TABLE manifest_references (
    repository_id BIGINT NOT NULL,
    manifest_digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    child_digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (repository_id, manifest_digest, child_digest),
    FOREIGN KEY (repository_id, manifest_digest) REFERENCES manifests (repository_id, digest) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX manifest_references_by_child ON manifest_references (child_digest);

CREATE TABLE tags (
    repository_id BIGINT NOT NULL,
    name VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    manifest_digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, name),
    FOREIGN KEY (repository_id, manifest_digest) REFERENCES manifests (repository_id, digest) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE uploads (
    id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    repository VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
