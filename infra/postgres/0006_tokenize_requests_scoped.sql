-- Issue 14: a Tokenize request id answers only the caller that sent it, and is kept only as a
-- keyed hash. Before, any identity could replay another's request id with a guessed card
-- number and learn from ALREADY_EXISTS vs OK whether the guess was right, writing nothing;
-- and the ids sat in clear.
--
-- request_key = HMAC-SHA-256(the tenant's fingerprint key, caller, request id) (see
-- crypto.FingerprintKey.request_key): SQL cannot compute it for the old rows, so they go.
-- They only made retries of calls already answered idempotent.
DROP TABLE tokenize_requests;

CREATE TABLE tokenize_requests (
    tenant       text        NOT NULL,
    caller       text        NOT NULL,   -- the mTLS identity (SPIFFE URI) that sent it
    request_key  bytea       NOT NULL CHECK (octet_length(request_key) = 32),
    fingerprint  bytea       NOT NULL,
    token        text        NOT NULL,
    created      boolean     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, caller, request_key)
);
CREATE INDEX tokenize_requests_created_at ON tokenize_requests (created_at);

GRANT SELECT, INSERT, DELETE ON tokenize_requests TO vaultline_app;
