-- Bearer tokens of every role. Only the SHA-256 of a token is stored: tokens are 256-bit random
-- values, so a fast hash is enough (there is nothing to brute-force), and lookups stay cheap.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'engineer', 'labeler', 'client')),
    token_sha256 bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
