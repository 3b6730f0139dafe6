-- One database role per process (issue 14): each holds only what its process uses, so a
-- stolen password opens no more than that process could. The roles are created (LOGIN,
-- no other attributes) by whoever bootstraps the database — `vaultline dev up`
-- (devstack.postgres.bootstrap_database) or the DBA — before `vaultline db migrate`:
--
--   vaultline_app      the tokenizer: vault tables, the audit trail (append through
--                      audit_append, read), settlement through its functions
--   vaultline_ivr      the IVR: its capture sessions, and audit appends for its call events
--   vaultline_auditor  `vaultline audit verify|tail`: reads the audit trail, nothing else
--   vaultline_keys     `vaultline keys status|rotate`: reads data keys and swaps in rewrapped
--                      ones (wrapped_key and kek_version only; wrapped keys are ciphertext)
--
-- `vaultline settle` holds no database credentials at all: it is a client of the tokenizer.

REVOKE ALL ON ivr_sessions FROM vaultline_app;
GRANT SELECT, INSERT, UPDATE ON ivr_sessions TO vaultline_ivr;
GRANT EXECUTE ON FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[],
                                       text[], text[], text[], text[], bytea[], text[])
    TO vaultline_ivr;

GRANT SELECT ON audit_log, audit_head TO vaultline_auditor;

GRANT SELECT ON data_keys TO vaultline_keys;
GRANT UPDATE (wrapped_key, kek_version) ON data_keys TO vaultline_keys;
