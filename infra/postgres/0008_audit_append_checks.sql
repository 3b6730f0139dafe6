-- audit_append no longer trusts its caller (issue 14, finding 3a): the application role, which
-- the services share, appended a forged record dated last year with a hash of its choosing.
-- The content hash is now recomputed here, byte for byte as vaultline.security.audit.canonical
-- encodes a record, and a record must be dated now.

-- The database is UTF-8, so a text's bytes (textsend) are its UTF-8 encoding.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'the vault database must be UTF8-encoded';
    END IF;
END
$$;

-- Format 1 (no token list): 'vaultline-audit' NUL, version 1 (2 bytes), the time as int64
-- microseconds since the epoch, then the nine text fields, each as a 4-byte big-endian
-- length and its UTF-8 bytes. Format 2 (a token list): version 2, the same, then the number
-- of tokens (4 bytes) and each token the same way. PL/pgSQL, not an SQL function: this one
-- costs ~3.5 µs a record where the SQL form (not inlinable) cost ~70 µs.
CREATE FUNCTION audit_content_hash(
    p_at timestamptz, p_identity text, p_role text, p_tenant text, p_method text,
    p_token text, p_purpose text, p_outcome text, p_request_id text, p_peer text,
    p_tokens text[]
) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    n  integer := coalesce(cardinality(p_tokens), 0);
    b  bytea;
    t  text;
BEGIN
    b := '\x7661756c746c696e652d617564697400'::bytea
         || CASE WHEN n > 0 THEN '\x0002'::bytea ELSE '\x0001'::bytea END
         || int8send((extract(epoch FROM p_at) * 1000000)::bigint)
         || int4send(octet_length(p_identity)) || textsend(p_identity)
         || int4send(octet_length(p_role)) || textsend(p_role)
         || int4send(octet_length(p_tenant)) || textsend(p_tenant)
         || int4send(octet_length(p_method)) || textsend(p_method)
         || int4send(octet_length(p_token)) || textsend(p_token)
         || int4send(octet_length(p_purpose)) || textsend(p_purpose)
         || int4send(octet_length(p_outcome)) || textsend(p_outcome)
         || int4send(octet_length(p_request_id)) || textsend(p_request_id)
         || int4send(octet_length(p_peer)) || textsend(p_peer);
    IF n > 0 THEN
        b := b || int4send(n);
        FOREACH t IN ARRAY p_tokens LOOP
            b := b || int4send(octet_length(t)) || textsend(t);
        END LOOP;
    END IF;
    RETURN sha256(b);
END
$$;

CREATE OR REPLACE FUNCTION audit_append(
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

    -- Nothing the caller says is taken on trust: each record's content hash is recomputed from
    -- its fields, and its time must be now (give or take the moments a call takes), so no
    -- role can append a record that says something else than it hashes, or date one in the
    -- past or the future. Set-based, one statement each: no per-record plpgsql steps.
    IF EXISTS (SELECT 1 FROM unnest(p_at) AS a(at)
               WHERE a.at IS NULL OR a.at < clock_timestamp() - interval '10 minutes'
                  OR a.at > clock_timestamp() + interval '1 minute')
    THEN
        RAISE EXCEPTION 'audit_append: a record is not dated now'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1
               FROM unnest(p_at, p_identity, p_role, p_tenant, p_method, p_token, p_purpose,
                           p_outcome, p_request_id, p_peer, p_content_hash, p_tokens)
                   AS u(at, identity, role, tenant, method, token, purpose, outcome,
                        request_id, peer, content_hash, tokens)
               WHERE u.content_hash IS DISTINCT FROM audit_content_hash(
                   u.at, u.identity, u.role, u.tenant, u.method, u.token, u.purpose,
                   u.outcome, u.request_id, u.peer, string_to_array(u.tokens, ' ')))
    THEN
        RAISE EXCEPTION 'audit_append: a record does not match its content hash'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

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
