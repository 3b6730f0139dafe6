# Policy "tokenizer": the tokenizer service (AppRole vaultline-tokenizer).
# Exactly the two endpoints it calls: it creates data keys (datakey/plaintext) and unwraps them
# (decrypt) under the KEK "vaultline-kek" - nothing else: no wrapped-only data keys, no rewrap
# (the keys-admin's job), no key read, no rotation, no encrypt/decrypt under other keys, no
# sys/. Roles get token_no_default_policy, so not even the "default" policy's self-lookup
# applies.

path "transit/datakey/plaintext/vaultline-kek" {
  capabilities = ["update"]
}

path "transit/decrypt/vaultline-kek" {
  capabilities = ["update"]
}

# The audit chain's anchor (issue 14): every minute or 1,000 records the tokenizer signs a
# checkpoint (seq, head hash, time) with the audit key and files it under its own path, once:
# create but never update, delete or destroy, so nobody holding the database can move it.
path "transit/sign/vaultline-audit" {
  capabilities = ["update"]
}

path "transit/verify/vaultline-audit" {
  capabilities = ["update"]
}

path "vaultline-kv/data/audit/checkpoints/*" {
  capabilities = ["create", "read"]
}

path "vaultline-kv/metadata/audit/checkpoints/*" {
  capabilities = ["list"]
}

# The recording vault (issue 17): RecordingService.GetRecordingKey unwraps a recording's content
# key for an allowed, audited listener (the qa role), whose machine decrypts the audio.
path "transit/decrypt/vaultline-recordings" {
  capabilities = ["update"]
}

# ... and only for a recording whose certification the ingest signed.
path "transit/verify/vaultline-recording-certs" {
  capabilities = ["update"]
}
