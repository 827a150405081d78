-- Byte quotas per repository prefix, as ../0004_quotas.sql. A rule is a repository name prefix
-- with an optional `/*` (257 characters at most), a scope a repository name prefix.
CREATE TABLE quota_rules (
    rule VARCHAR(257) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    max_bytes BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE quota_scopes (
    rule VARCHAR(257) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    scope VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (rule, scope)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE quota_holdings (
    rule VARCHAR(257) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    scope VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    digest VARCHAR(135) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    size BIGINT NOT NULL,
    holders BIGINT NOT NULL,
    PRIMARY KEY (rule, scope, digest)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
