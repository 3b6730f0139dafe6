-- Security codes held until authorisation (issue 15, item 3; PCI DSS 3.3.2). A capture that
-- collects a card's security code hands it to Tokenize; the tokenizer seals it under the
-- tenant's own `security_code` data key (never the card-data key) and keeps it here until
-- the merchant's payment service redeems it (RedeemSecurityCode: DELETE … RETURNING, so at
-- most once) or it expires (a sweeper deletes expired rows; redemption never answers one).
-- One held code per token: a new capture of the same card replaces it.
--
-- Deleting a token (DeleteToken, expiry purge, ShredTenant) deletes its held code with it.

ALTER TABLE data_keys DROP CONSTRAINT data_keys_purpose_check;
ALTER TABLE data_keys ADD CONSTRAINT data_keys_purpose_check
    CHECK (purpose IN ('pan', 'fingerprint', 'security_code'));

CREATE TABLE security_codes (
    tenant       text        NOT NULL,
    token        text        NOT NULL,
    data_key_id  bigint      NOT NULL REFERENCES data_keys (id),
    ciphertext   bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    -- The hold is short by design: the tokenizer allows at most one hour.
    CHECK (expires_at <= created_at + interval '1 hour'),
    PRIMARY KEY (tenant, token),
    FOREIGN KEY (tenant, token) REFERENCES tokens (tenant, token) ON DELETE CASCADE
);
CREATE INDEX security_codes_expires_at ON security_codes (expires_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON security_codes TO vaultline_app;
