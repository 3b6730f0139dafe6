-- Vault schema: wrapped data keys, encrypted cards, idempotency records.
-- Applied by `vaultline db migrate` (and `vaultline dev up`) as the schema owner, in a
-- transaction. The service logs in as vaultline_app, which gets only the grants below.
-- No column ever holds a PAN in clear: `tokens.ciphertext` is AES-256-GCM under a data key,
-- `data_keys.wrapped_key` is that key encrypted by the OpenBao transit KEK.

CREATE TABLE data_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant       text        NOT NULL,
    purpose      text        NOT NULL CHECK (purpose IN ('pan', 'fingerprint')),
    wrapped_key  text        NOT NULL CHECK (wrapped_key LIKE 'vault:v%'),
    kek_version  integer     NOT NULL CHECK (kek_version > 0),
    max_uses     bigint      NOT NULL CHECK (max_uses > 0),
    uses         bigint      NOT NULL DEFAULT 0 CHECK (uses >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    retire_at    timestamptz NOT NULL,
    retired_at   timestamptz
);
-- One key in service per tenant and purpose; retired keys stay to decrypt what they sealed.
CREATE UNIQUE INDEX data_keys_active ON data_keys (tenant, purpose) WHERE retired_at IS NULL;

CREATE TABLE tokens (
    tenant        text        NOT NULL,
    token         text        NOT NULL,
    fingerprint   bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    format        smallint    NOT NULL,
    brand         smallint    NOT NULL,
    bin           text        NOT NULL,
    last4         text        NOT NULL,
    expiry_month  smallint    NOT NULL,
    expiry_year   smallint    NOT NULL,
    data_key_id   bigint      NOT NULL REFERENCES data_keys (id),
    ciphertext    bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    PRIMARY KEY (tenant, token)
);
-- One token per card, tenant and format: found through the keyed fingerprint.
CREATE UNIQUE INDEX tokens_fingerprint ON tokens (tenant, format, fingerprint);
CREATE INDEX tokens_expires_at ON tokens (expires_at) WHERE expires_at IS NOT NULL;

-- A retried Tokenize with the same request_id returns the first result.
CREATE TABLE tokenize_requests (
    tenant       text        NOT NULL,
    request_id   text        NOT NULL,
    fingerprint  bytea       NOT NULL,
    token        text        NOT NULL,
    created      boolean     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX tokenize_requests_created_at ON tokenize_requests (created_at);

-- Least privilege for the service role (PCI DSS 7.2.5): data only, no DDL, no TRUNCATE.
GRANT SELECT, INSERT, UPDATE ON data_keys TO vaultline_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tokens TO vaultline_app;
GRANT SELECT, INSERT, DELETE ON tokenize_requests TO vaultline_app;
