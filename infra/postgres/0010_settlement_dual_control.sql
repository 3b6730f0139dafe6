-- Dual control enforced by the server (issue 14, finding 2). The application role may no
-- longer write a batch's state: it reads batches and rows, inserts rows only into a batch
-- still being created, and changes state only through the functions below, each of which
-- checks the state machine and dual control itself. The tokenizer's SettlementService is
-- their only caller and audits every call; an approval also carries the tokenizer's OpenBao
-- signature (`approval_signature`), which no database role can make, and a run is refused
-- without it. `rows_sha256` is computed here, from the stored rows, never taken from a client.

ALTER TABLE settlement_batches
    ADD COLUMN rows_sha256        text CHECK (rows_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN approval_signature text CHECK (approval_signature ~ '^vault:v[0-9]+:'),
    ADD COLUMN run_by             text;
-- Batches of the old rules: their rows are sealed as they are; an approval without the
-- tokenizer's signature does not count, so approved (not yet done) batches are approved again.
UPDATE settlement_batches b SET rows_sha256 = encode(sha256(convert_to(coalesce((
        SELECT string_agg(reference || E'\t' || token || E'\t' || amount_minor::text
            || E'\t' || currency || E'\t' || auth_code || E'\n', '' ORDER BY line)
        FROM settlement_rows r WHERE r.batch_id = b.id), ''), 'UTF8')), 'hex');
ALTER TABLE settlement_batches DROP CONSTRAINT settlement_approved;
UPDATE settlement_batches SET state = 'created', approved_by = NULL, approved_at = NULL,
    run_id = NULL, run_host = NULL, run_pid = NULL, lease_until = NULL
    WHERE state IN ('approved', 'running');
ALTER TABLE settlement_batches ADD CONSTRAINT settlement_approved
    CHECK (state = 'created' OR (approved_by IS NOT NULL AND rows_sha256 IS NOT NULL));
ALTER TABLE settlement_batches ADD CONSTRAINT settlement_run_not_by_approver
    CHECK (run_by IS NULL OR run_by <> approved_by);
-- A batch is created empty, filled, then sealed by settlement_seal (which sets its counts).
ALTER TABLE settlement_batches DROP CONSTRAINT settlement_batches_row_count_check;
ALTER TABLE settlement_batches ADD CONSTRAINT settlement_batches_row_count_check
    CHECK (row_count >= 0 AND (rows_sha256 IS NULL OR row_count > 0));

REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON settlement_batches FROM vaultline_app;
REVOKE UPDATE, DELETE, TRUNCATE ON settlement_rows FROM vaultline_app;
GRANT SELECT ON settlement_batches TO vaultline_app;
GRANT SELECT, INSERT ON settlement_rows TO vaultline_app;

-- The digest of a batch's rows (`batches.RowsDigest` in Python): in line order,
-- reference TAB token TAB amount TAB currency TAB auth_code LF.
CREATE FUNCTION settlement_rows_sha256(p_batch text) RETURNS text
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    SELECT encode(sha256(convert_to(coalesce(string_agg(
        reference || E'\t' || token || E'\t' || amount_minor::text || E'\t' || currency
        || E'\t' || auth_code || E'\n', '' ORDER BY line), ''), 'UTF8')), 'hex')
    FROM settlement_rows WHERE batch_id = p_batch
$$;

-- Rows go only into a batch that is being created and not yet sealed. FOR SHARE waits for
-- a concurrent seal or approval, then sees its outcome.
CREATE FUNCTION settlement_rows_insert_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM settlement_batches
        WHERE id IN (SELECT DISTINCT batch_id FROM added) FOR SHARE;
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT batch_id FROM added) a
               LEFT JOIN settlement_batches b ON b.id = a.batch_id
               WHERE b.state IS DISTINCT FROM 'created' OR b.rows_sha256 IS NOT NULL) THEN
        RAISE EXCEPTION 'settlement rows: only a batch being created takes rows'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER settlement_rows_insert_check AFTER INSERT ON settlement_rows
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT
    EXECUTE FUNCTION settlement_rows_insert_check();

CREATE FUNCTION settlement_create(p_id text, p_tenant text, p_created_by text,
                                  p_input_sha256 text, p_input_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_created_by NOT LIKE 'spiffe://vaultline/settlement/%' THEN
        RAISE EXCEPTION 'settlement: only a settlement identity creates batches'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO settlement_batches (id, tenant, created_by, input_sha256, input_name,
                                    row_count, totals)
    VALUES (p_id, p_tenant, p_created_by, p_input_sha256, p_input_name, 0, '{}'::jsonb);
END
$$;

-- Sealing fixes the rows: their count, totals and digest are computed here.
CREATE FUNCTION settlement_seal(p_id text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    n bigint;
    t jsonb;
    digest text;
BEGIN
    PERFORM 1 FROM settlement_batches
        WHERE id = p_id AND state = 'created' AND rows_sha256 IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'settlement: batch % is not being created', p_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT count(*) INTO n FROM settlement_rows WHERE batch_id = p_id;
    SELECT coalesce(jsonb_object_agg(currency, jsonb_build_object(
               'count', c, 'amount_minor', s)), '{}'::jsonb) INTO t
        FROM (SELECT currency, count(*) AS c, sum(amount_minor) AS s FROM settlement_rows
              WHERE batch_id = p_id GROUP BY currency ORDER BY currency) per_currency;
    digest := settlement_rows_sha256(p_id);
    UPDATE settlement_batches SET row_count = n, totals = t, rows_sha256 = digest
        WHERE id = p_id;
    RETURN digest;
END
$$;

-- created → approved: by a settlement identity other than the creator, naming the digest
-- of the rows as stored (recomputed here, under the lock that keeps rows out).
CREATE FUNCTION settlement_approve(p_id text, p_approver text, p_rows_sha256 text,
                                   p_signature text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    b settlement_batches%ROWTYPE;
BEGIN
    SELECT * INTO b FROM settlement_batches WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR b.state <> 'created' OR b.rows_sha256 IS NULL THEN
        RAISE EXCEPTION 'settlement: batch % is not awaiting approval', p_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF p_approver NOT LIKE 'spiffe://vaultline/settlement/%' OR p_approver = b.created_by THEN
        RAISE EXCEPTION 'settlement: dual control refuses this approver'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_rows_sha256 IS DISTINCT FROM b.rows_sha256
       OR p_rows_sha256 IS DISTINCT FROM settlement_rows_sha256(p_id) THEN
        RAISE EXCEPTION 'settlement: the rows are not the ones approved'
            USING ERRCODE = 'data_exception';
    END IF;
    UPDATE settlement_batches SET state = 'approved', approved_by = p_approver,
        approved_at = now(), approval_signature = p_signature WHERE id = p_id;
END
$$;

-- approved → running under p_run_id for p_run_by; or take over a running batch whose lease
-- ran out, or whose run p_take_over is the caller's own.
CREATE FUNCTION settlement_start_run(p_id text, p_run_id uuid, p_run_by text, p_host text,
                                     p_pid integer, p_lease interval, p_take_over uuid)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    UPDATE settlement_batches SET state = 'running', run_id = p_run_id, run_by = p_run_by,
        run_host = p_host, run_pid = p_pid, run_started_at = now(),
        lease_until = now() + p_lease, runs = runs + 1
    WHERE id = p_id AND approval_signature IS NOT NULL AND p_run_by <> approved_by
      AND (state = 'approved' OR (state = 'running' AND (lease_until < now()
           OR (run_id = p_take_over AND run_by = p_run_by))));
    RETURN FOUND;
END
$$;

CREATE FUNCTION settlement_renew_run(p_id text, p_run_id uuid, p_run_by text,
                                     p_lease interval) RETURNS timestamptz
LANGUAGE sql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    UPDATE settlement_batches SET lease_until = now() + p_lease
    WHERE id = p_id AND state = 'running' AND run_id = p_run_id AND run_by = p_run_by
    RETURNING lease_until
$$;

CREATE FUNCTION settlement_finish_run(p_id text, p_run_id uuid, p_run_by text,
                                      p_summary jsonb) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    UPDATE settlement_batches SET state = 'done', done_at = now(), lease_until = NULL,
        summary = p_summary
    WHERE id = p_id AND state = 'running' AND run_id = p_run_id AND run_by = p_run_by;
    RETURN FOUND;
END
$$;

CREATE FUNCTION settlement_abandon_run(p_id text, p_run_id uuid, p_run_by text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    UPDATE settlement_batches SET lease_until = now() - interval '1 microsecond'
    WHERE id = p_id AND state = 'running' AND run_id = p_run_id AND run_by = p_run_by;
    RETURN FOUND;
END
$$;

REVOKE ALL ON FUNCTION settlement_rows_sha256(text), settlement_rows_insert_check(),
    settlement_create(text, text, text, text, text), settlement_seal(text),
    settlement_approve(text, text, text, text),
    settlement_start_run(text, uuid, text, text, integer, interval, uuid),
    settlement_renew_run(text, uuid, text, interval),
    settlement_finish_run(text, uuid, text, jsonb),
    settlement_abandon_run(text, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION settlement_rows_sha256(text),
    settlement_create(text, text, text, text, text),
    settlement_seal(text), settlement_approve(text, text, text, text),
    settlement_start_run(text, uuid, text, text, integer, interval, uuid),
    settlement_renew_run(text, uuid, text, interval),
    settlement_finish_run(text, uuid, text, jsonb),
    settlement_abandon_run(text, uuid, text) TO vaultline_app;

-- Unary Detokenize's daily budget per identity (issue 14): counted here so that it holds
-- across restarts and replicas.
CREATE TABLE detokenize_budget (
    identity text    NOT NULL,
    day      date    NOT NULL,
    used     integer NOT NULL CHECK (used >= 0),
    PRIMARY KEY (identity, day)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON detokenize_budget TO vaultline_app;
