-- Leases and pushes' holds, as ../0005_leases.sql.
CREATE TABLE leases (
    name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    holder VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    expires_at_ms BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE holds (
    id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    INDEX holds_by_digest (digest)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
