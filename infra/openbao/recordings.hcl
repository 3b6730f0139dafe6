# Policy "recordings": the recording vault's ingest (AppRole vaultline-recordings), held by the
# IVR service, and `vaultline recordings public-key|scan`.
# It reads the public half of the RSA-4096 key Twilio encrypts recordings to (the private half
# is not exportable: reading the key never shows it) and unwraps content keys with it, to prove
# each recording free of keypad tones in memory. Nothing else: not the KEK, not the audit key.

path "transit/keys/vaultline-recordings" {
  capabilities = ["read"]
}

path "transit/decrypt/vaultline-recordings" {
  capabilities = ["update"]
}

# Each certification (certified / quarantined, the media's hash, where the tones are) is
# signed, so a database password alone cannot release a quarantined recording.
path "transit/sign/vaultline-recording-certs" {
  capabilities = ["update"]
}
