-- Audit trail (PCI DSS 10.2, 10.3.2, 10.3.4): one row per call and per token revealed,
-- hash-chained, append-only. Applied as the schema owner in a transaction.
--
--   content_hash = SHA-256(canonical encoding of the row's fields)   computed by the app
--                  (vaultline.security.audit.canonical; versioned, length-prefixed)
--   hash         = SHA-256(prev_hash || content_hash)                 computed here, in order
--   prev_hash    = the previous row's hash; 32 zero bytes before seq 1
--
-- audit_head holds the last (seq, hash): a deleted tail leaves the head pointing past the last
-- row, so truncation is as visible as an edit. `vaultline audit verify` recomputes all of it.
--
-- The only write path is audit_append() (SECURITY DEFINER, owned by the schema owner). The
-- service role gets EXECUTE on it and SELECT on the tables, but no INSERT, UPDATE, DELETE or
-- TRUNCATE: a direct INSERT would skip the lock, the chain and the head. seq is assigned by
-- audit_append() from the head rather than by a sequence, so an append that rolls back
-- (timeout, lost connection) leaves no gap that verification would read as a deleted record.

CREATE TABLE audit_log (
    seq           bigint      PRIMARY KEY CHECK (seq > 0),
    at            timestamptz NOT NULL,
    identity      text        NOT NULL,
    role          text        NOT NULL,
    tenant        text        NOT NULL,
    method        text        NOT NULL,
    token         text        NOT NULL,  -- a token, never a PAN; '' when the call named none
    purpose       text        NOT NULL,
    outcome       text        NOT NULL,  -- gRPC status code name: OK, PERMISSION_DENIED, ...
    request_id    text        NOT NULL,
    peer          text        NOT NULL,
    content_hash  bytea       NOT NULL CHECK (octet_length(content_hash) = 32),
    prev_hash     bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash          bytea       NOT NULL CHECK (octet_length(hash) = 32)
);

CREATE TABLE audit_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq        bigint  NOT NULL CHECK (seq >= 0),
    hash       bytea   NOT NULL CHECK (octet_length(hash) = 32)
);
INSERT INTO audit_head (seq, hash) VALUES (0, decode(repeat('00', 32), 'hex'));

-- Defence in depth: even the owner cannot change or remove audit rows by accident. A
-- superuser (or the owner, by dropping the trigger first) still can; the chain exposes it.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

-- Appends a batch in one round trip: arrays of the fields, one element per record, in order.
-- Returns the (seq, hash) given to each, in the same order.
CREATE FUNCTION audit_append(
    p_at            timestamptz[],
    p_identity      text[],
    p_role          text[],
    p_tenant        text[],
    p_method        text[],
    p_token         text[],
    p_purpose       text[],
    p_outcome       text[],
    p_request_id    text[],
    p_peer          text[],
    p_content_hash  bytea[]
) RETURNS TABLE (seq bigint, hash bytea)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n          integer := coalesce(cardinality(p_content_hash), 0);
    head_seq   bigint;
    head_hash  bytea;
    prevs      bytea[];
    hashes     bytea[];
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    IF coalesce(cardinality(p_at), -1) <> n OR coalesce(cardinality(p_identity), -1) <> n
       OR coalesce(cardinality(p_role), -1) <> n OR coalesce(cardinality(p_tenant), -1) <> n
       OR coalesce(cardinality(p_method), -1) <> n OR coalesce(cardinality(p_token), -1) <> n
       OR coalesce(cardinality(p_purpose), -1) <> n OR coalesce(cardinality(p_outcome), -1) <> n
       OR coalesce(cardinality(p_request_id), -1) <> n OR coalesce(cardinality(p_peer), -1) <> n
    THEN
        RAISE EXCEPTION 'audit_append: arrays of different lengths'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- One appender at a time, held to commit: the next one reads this one's head.
    PERFORM pg_advisory_xact_lock(7462);
    SELECT h.seq, h.hash INTO STRICT head_seq, head_hash FROM audit_head h WHERE h.singleton;

    prevs := array_fill(NULL::bytea, ARRAY[n]);
    hashes := array_fill(NULL::bytea, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        prevs[i] := head_hash;
        head_hash := sha256(head_hash || p_content_hash[i]);
        hashes[i] := head_hash;
    END LOOP;

    -- prevs and hashes are unnested beside the inputs, not subscripted per row: finding the
    -- i-th element of a bytea[] walks the array, which made a 1,000-record append quadratic.
    INSERT INTO audit_log (seq, at, identity, role, tenant, method, token, purpose, outcome,
                           request_id, peer, content_hash, prev_hash, hash)
    SELECT head_seq + u.ord, u.at, u.identity, u.role, u.tenant, u.method, u.token, u.purpose,
           u.outcome, u.request_id, u.peer, u.content_hash, u.prev_hash, u.hash
    FROM unnest(p_at, p_identity, p_role, p_tenant, p_method, p_token, p_purpose, p_outcome,
                p_request_id, p_peer, p_content_hash, prevs, hashes) WITH ORDINALITY
        AS u(at, identity, role, tenant, method, token, purpose, outcome, request_id, peer,
             content_hash, prev_hash, hash, ord);

    UPDATE audit_head h SET seq = head_seq + n, hash = head_hash WHERE h.singleton;

    RETURN QUERY SELECT head_seq + r.ord, r.hash
        FROM unnest(hashes) WITH ORDINALITY AS r(hash, ord);
END
$$;

REVOKE ALL ON FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[],
                                    text[], text[], text[], text[], bytea[]) FROM PUBLIC;

-- The service appends only through audit_append and reads (audit tail, audit verify).
GRANT SELECT ON audit_log, audit_head TO vaultline_app;
GRANT EXECUTE ON FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[],
                                       text[], text[], text[], text[], bytea[]) TO vaultline_app;
