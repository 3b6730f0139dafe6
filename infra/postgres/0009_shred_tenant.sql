-- Crypto-shredding a tenant (issue 14, item 5): its data keys are destroyed, so none of its
-- card data can be opened again, wherever a copy of a ciphertext survives (WAL, replicas,
-- backups); its tokens and idempotency records are deleted with them. The service role may
-- not delete data keys itself: it calls this, as the admin API's KeyService.ShredTenant does
-- (audited there), and the function answers what it removed.
CREATE FUNCTION shred_tenant(p_tenant text)
RETURNS TABLE (data_keys_destroyed bigint, tokens_deleted bigint, key_ids bigint[])
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    n_tokens bigint;
    n_keys   bigint;
    ids      bigint[];
BEGIN
    IF p_tenant IS NULL OR p_tenant = '' THEN
        RAISE EXCEPTION 'shred_tenant: a tenant is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM tokenize_requests WHERE tenant = p_tenant;
    DELETE FROM tokens WHERE tenant = p_tenant;
    GET DIAGNOSTICS n_tokens = ROW_COUNT;
    WITH gone AS (DELETE FROM data_keys WHERE tenant = p_tenant RETURNING id)
    SELECT count(*), coalesce(array_agg(id), '{}') INTO n_keys, ids FROM gone;
    RETURN QUERY SELECT n_keys, n_tokens, ids;
END
$$;

REVOKE ALL ON FUNCTION shred_tenant(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shred_tenant(text) TO vaultline_app;
