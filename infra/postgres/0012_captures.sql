-- Agent-assisted captures (issue 15): the CRM starts one through the tokenizer's
-- CaptureService; an IVR replica drives the Payment on the call (Twilio's Payment resource)
-- and records its masked progress as events; watchers connected to any tokenizer replica
-- follow the events (NOTIFY vaultline_capture, payload: the capture id).
--
-- No column holds card data: the card goes from Twilio to the Pay Connector and the vault;
-- a capture keeps the token and what GetToken shows of it.

CREATE TABLE captures (
    id              text        PRIMARY KEY CHECK (id ~ '^cap_[0-9a-f]{20}$'),
    tenant          text        NOT NULL,
    call_sid        text        NOT NULL CHECK (call_sid ~ '^CA[0-9a-f]{32}$'),
    agent_id        text        NOT NULL,
    requested_by    text        NOT NULL,       -- the crm identity that started it
    request_id      text        NOT NULL,       -- its idempotency key (validated, no PAN)
    security_code   boolean     NOT NULL,
    postal_code     boolean     NOT NULL,
    token_format    smallint    NOT NULL,
    state           text        NOT NULL DEFAULT 'started'
                    CHECK (state IN ('started', 'capturing', 'completed', 'failed',
                                     'cancelled')),
    field           text        NOT NULL DEFAULT ''
                    CHECK (field IN ('', 'card-number', 'expiration-date', 'security-code',
                                     'postal-code')),
    -- What the agent asked the IVR to do next, until an IVR replica does it:
    -- 'start', 'cancel', 'restart:<field>', or '' for nothing.
    command         text        NOT NULL DEFAULT 'start',
    payment_sid     text        CHECK (payment_sid ~ '^PK[0-9a-f]{32}$'),
    token           text,
    brand           smallint,
    last4           text        CHECK (last4 ~ '^[0-9]{4}$'),
    expiry_month    smallint,
    expiry_year     smallint,
    failure_reason  text        NOT NULL DEFAULT '',
    last_seq        bigint      NOT NULL DEFAULT 0,
    -- The IVR's Payment driver state (ivr/payment.py), compare-and-set on driver_version.
    driver          jsonb       NOT NULL DEFAULT '{}',
    driver_version  integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (requested_by, request_id)
);
-- One capture in progress per call.
CREATE UNIQUE INDEX captures_active_call ON captures (call_sid)
    WHERE state IN ('started', 'capturing');
CREATE INDEX captures_pending_command ON captures (updated_at) WHERE command <> '';

CREATE TABLE capture_events (
    capture_id      text        NOT NULL REFERENCES captures (id),
    seq             bigint      NOT NULL CHECK (seq > 0),
    at              timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL,
    field           text        NOT NULL DEFAULT '',
    digits_entered  integer     NOT NULL DEFAULT 0 CHECK (digits_entered BETWEEN 0 AND 19),
    field_outcome   text        NOT NULL DEFAULT '',
    attempt         integer     NOT NULL DEFAULT 0,
    token           text,
    brand           smallint,
    last4           text,
    expiry_month    smallint,
    expiry_year     smallint,
    failure_reason  text        NOT NULL DEFAULT '',
    PRIMARY KEY (capture_id, seq)
);

-- An event: the next seq, the capture's new state, and a notification, in one statement.
-- Fields left NULL keep the capture's value.
CREATE FUNCTION capture_append_event(
    p_id text, p_state text, p_field text, p_digits integer, p_outcome text,
    p_attempt integer, p_token text, p_brand smallint, p_last4 text, p_expiry_month smallint,
    p_expiry_year smallint, p_failure text
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE captures SET last_seq = last_seq + 1, state = p_state, field = p_field,
        token = coalesce(p_token, token), brand = coalesce(p_brand, brand),
        last4 = coalesce(p_last4, last4), expiry_month = coalesce(p_expiry_month, expiry_month),
        expiry_year = coalesce(p_expiry_year, expiry_year),
        failure_reason = coalesce(nullif(p_failure, ''), failure_reason), updated_at = now()
    WHERE id = p_id
    RETURNING last_seq INTO n;
    IF n IS NULL THEN
        RAISE EXCEPTION 'capture % does not exist', p_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO capture_events (capture_id, seq, state, field, digits_entered, field_outcome,
                                attempt, token, brand, last4, expiry_month, expiry_year,
                                failure_reason)
    VALUES (p_id, n, p_state, p_field, p_digits, p_outcome, p_attempt, p_token, p_brand,
            p_last4, p_expiry_month, p_expiry_year, p_failure);
    PERFORM pg_notify('vaultline_capture', p_id);
    RETURN n;
END
$$;

-- The tokenizer starts, reads and commands captures; the IVR drives them.
GRANT SELECT, INSERT, UPDATE ON captures TO vaultline_app, vaultline_ivr;
GRANT SELECT, INSERT ON capture_events TO vaultline_app, vaultline_ivr;
REVOKE ALL ON FUNCTION capture_append_event(text, text, text, integer, text, integer, text,
    smallint, text, smallint, smallint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION capture_append_event(text, text, text, integer, text, integer, text,
    smallint, text, smallint, smallint, text) TO vaultline_app, vaultline_ivr;
