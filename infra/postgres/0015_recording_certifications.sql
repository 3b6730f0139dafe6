-- Signed certifications (issue 17): the ingest signs each recording's certification with the
-- OpenBao Ed25519 key vaultline-recording-certs (the message: the recording SID, its state,
-- the media's SHA-256 and where the tones are); the tokenizer verifies it before handing out a
-- recording's key. A state written around the ingest — by whoever holds the IVR's database
-- password — has no valid signature, and the recording stays unplayable.
ALTER TABLE recordings ADD COLUMN certification text NOT NULL DEFAULT '';
