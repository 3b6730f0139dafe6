-- Settlement batches (vaultline settle): a validated capture file awaiting dual control, then
-- run into an OpenPGP-encrypted processor file. Rows hold tokens only, never a PAN.
--
-- State machine: created → approved (by a different identity) → running → done.
-- `running` carries a lease (run_id, run_host, run_pid, lease_until) so a crashed run can be
-- taken over by the next `settle run`; a run that is alive renews its lease.

CREATE TABLE settlement_batches (
    id             text        PRIMARY KEY CHECK (id ~ '^sb_[0-9a-f]{10}$'),
    tenant         text        NOT NULL,
    state          text        NOT NULL DEFAULT 'created'
                               CHECK (state IN ('created', 'approved', 'running', 'done')),
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    approved_by    text,
    approved_at    timestamptz,
    input_sha256   text        NOT NULL CHECK (input_sha256 ~ '^[0-9a-f]{64}$'),
    input_name     text        NOT NULL DEFAULT '',
    row_count      integer     NOT NULL CHECK (row_count > 0),
    totals         jsonb       NOT NULL,  -- {"EUR": {"count": n, "amount_minor": m}, ...}
    run_id         uuid,
    run_host       text,
    run_pid        integer,
    run_started_at timestamptz,
    lease_until    timestamptz,
    runs           integer     NOT NULL DEFAULT 0,
    done_at        timestamptz,
    summary        jsonb,
    -- Dual control, enforced by the database too.
    CONSTRAINT settlement_dual_control CHECK (approved_by IS NULL OR approved_by <> created_by),
    CONSTRAINT settlement_approved CHECK (state = 'created' OR approved_by IS NOT NULL),
    CONSTRAINT settlement_done CHECK (state <> 'done' OR summary IS NOT NULL)
);
CREATE INDEX settlement_batches_created_at ON settlement_batches (created_at DESC);

CREATE TABLE settlement_rows (
    batch_id      text     NOT NULL REFERENCES settlement_batches (id),
    line          integer  NOT NULL,
    reference     text     NOT NULL,
    token         text     NOT NULL,
    amount_minor  bigint   NOT NULL CHECK (amount_minor > 0),
    currency      text     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    auth_code     text     NOT NULL DEFAULT '',
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, reference)
);

-- Least privilege: no DELETE, no TRUNCATE, no DDL; rows are written once.
GRANT SELECT, INSERT, UPDATE ON settlement_batches TO vaultline_app;
GRANT SELECT, INSERT ON settlement_rows TO vaultline_app;
