-- The recording vault (issue 17). Twilio encrypts every call recording to a key whose private
-- half never leaves OpenBao (transit key vaultline-recordings, RSA-4096); the IVR ingests it
-- (downloads the encrypted media, stores it unchanged, proves it free of keypad tones, then
-- deletes Twilio's copy) and the tokenizer's RecordingService hands the wrapped content key's
-- plaintext to an allowed listener, whose own machine decrypts the audio.
--
-- Nothing here is audio or a usable key: the media is in the recording store (files), still
-- encrypted; `encrypted_cek` is the content key wrapped under the OpenBao key. A row is also
-- the ingest's work item: one not yet `twilio_deleted_at` is picked up again until it is.

CREATE TABLE recordings (
    sid               text        PRIMARY KEY CHECK (sid ~ '^RE[0-9a-f]{32}$'),
    call_sid          text        NOT NULL CHECK (call_sid ~ '^CA[0-9a-f]{32}$'),
    tenant            text        NOT NULL,
    media_url         text        NOT NULL,      -- Twilio's, until its copy is deleted
    duration_seconds  integer     NOT NULL DEFAULT 0 CHECK (duration_seconds >= 0),
    public_key_sid    text        NOT NULL DEFAULT '',
    encrypted_cek     text        NOT NULL DEFAULT '',   -- base64, RSA-OAEP under OpenBao's key
    iv                text        NOT NULL DEFAULT '',   -- base64, 96 bits
    media_file        text        NOT NULL DEFAULT '',   -- name in the recording store
    media_sha256      bytea       CHECK (media_sha256 IS NULL OR octet_length(media_sha256) = 32),
    media_bytes       bigint      NOT NULL DEFAULT 0,
    -- received: the callback is in; stored: the encrypted file is durable and verified;
    -- certified / quarantined: scanned for keypad tones; unencrypted: Twilio sent it in the
    -- clear (never stored here: encryption must be turned on); corrupt: did not decrypt.
    state             text        NOT NULL DEFAULT 'received'
                      CHECK (state IN ('received', 'stored', 'certified', 'quarantined',
                                       'unencrypted', 'corrupt')),
    tones             jsonb       NOT NULL DEFAULT '[]',  -- [[start, end], …] seconds; no digits
    certified_at      timestamptz,
    twilio_deleted_at timestamptz,
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text        NOT NULL DEFAULT '',
    override_by       text        NOT NULL DEFAULT '',    -- the admin who released a quarantine
    override_reason   text        NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recordings_pending ON recordings (created_at) WHERE twilio_deleted_at IS NULL;
CREATE INDEX recordings_tenant ON recordings (tenant, created_at DESC);

-- The IVR ingests and certifies; the tokenizer lists, releases quarantines and purges.
GRANT SELECT, INSERT, UPDATE ON recordings TO vaultline_ivr;
GRANT SELECT, DELETE ON recordings TO vaultline_app;
GRANT UPDATE (override_by, override_reason, updated_at) ON recordings TO vaultline_app;
