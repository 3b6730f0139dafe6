-- IVR capture sessions (Gather mode). One row per capture on a call; several webhook replicas
-- share it. `state` holds only non-sensitive progress (step, attempts, brand, last four);
-- the interim card fields are in `sealed` only, AES-256-GCM under a per-call key derived
-- from a secret the webhook service holds (never stored here), and are set to NULL when the
-- capture ends, fails, times out or the caller hangs up. The result (token, brand, last
-- four, expiry, outcome) stays as the capture record.

CREATE TABLE ivr_sessions (
    id            uuid        PRIMARY KEY,
    call_sid      text        NOT NULL CHECK (call_sid ~ '^CA[0-9a-f]{32}$'),
    flow          text        NOT NULL,
    version       integer     NOT NULL DEFAULT 0,
    state         jsonb       NOT NULL,
    sealed        bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    outcome       text,
    token         text,
    brand         text,
    last4         text        CHECK (last4 ~ '^[0-9]{4}$'),
    expiry_month  smallint,
    expiry_year   smallint,
    -- An ended capture never holds card data.
    CONSTRAINT ivr_sessions_ended_erased CHECK (ended_at IS NULL OR sealed IS NULL)
);
-- One capture in progress per call.
CREATE UNIQUE INDEX ivr_sessions_active ON ivr_sessions (call_sid) WHERE ended_at IS NULL;
-- The sweeper finds abandoned captures still holding sealed fields.
CREATE INDEX ivr_sessions_expires_at ON ivr_sessions (expires_at) WHERE ended_at IS NULL;

-- Least privilege (PCI DSS 7.2.5): no DELETE, no TRUNCATE, no DDL for the service role.
GRANT SELECT, INSERT, UPDATE ON ivr_sessions TO vaultline_app;
