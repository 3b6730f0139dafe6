-- Reveal records name their tokens in a list: one record per revealed chunk, not per token.
--
-- A batch reveal used to append one chained row per token (PostgreSQL ~10 µs each, which
-- capped BatchDetokenize near 35k tokens/s). Now a chunk's reveal is ONE record whose
-- `tokens` column lists every token revealed, in order; its content hash covers the list, so
-- removing, adding or reordering a token breaks the chain exactly as editing any field does.
-- "Who revealed token T" is `WHERE token = T OR T = ANY(tokens)`.
--
-- Encoding (vaultline.security.audit.canonical): a record with an empty list keeps format 1,
-- byte for byte, so every record written before this migration still verifies; a record with
-- a list is format 2 (format 1's fields, then the count and each token, length-prefixed).

ALTER TABLE audit_log ADD COLUMN tokens text[] NOT NULL DEFAULT '{}'
    CHECK (array_position(tokens, NULL) IS NULL);

DROP FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[], text[],
                           text[], text[], text[], bytea[]);

-- As in 0002, plus p_tokens: one element per record, its tokens joined by single spaces
-- ('' for none). A token never holds a space (digits, or tok_ and base32), and the writer
-- refuses one that does, so the split is exact.
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
    p_content_hash  bytea[],
    p_tokens        text[]
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
       OR coalesce(cardinality(p_tokens), -1) <> n
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

    INSERT INTO audit_log (seq, at, identity, role, tenant, method, token, purpose, outcome,
                           request_id, peer, content_hash, prev_hash, hash, tokens)
    SELECT head_seq + u.ord, u.at, u.identity, u.role, u.tenant, u.method, u.token, u.purpose,
           u.outcome, u.request_id, u.peer, u.content_hash, u.prev_hash, u.hash,
           string_to_array(u.tokens, ' ')
    FROM unnest(p_at, p_identity, p_role, p_tenant, p_method, p_token, p_purpose, p_outcome,
                p_request_id, p_peer, p_content_hash, prevs, hashes, p_tokens) WITH ORDINALITY
        AS u(at, identity, role, tenant, method, token, purpose, outcome, request_id, peer,
             content_hash, prev_hash, hash, tokens, ord);

    UPDATE audit_head h SET seq = head_seq + n, hash = head_hash WHERE h.singleton;

    RETURN QUERY SELECT head_seq + r.ord, r.hash
        FROM unnest(hashes) WITH ORDINALITY AS r(hash, ord);
END
$$;

REVOKE ALL ON FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[],
                                    text[], text[], text[], text[], bytea[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_append(timestamptz[], text[], text[], text[], text[], text[],
                                       text[], text[], text[], text[], bytea[], text[])
    TO vaultline_app;
