# Policy "keys-admin": the `vaultline keys` CLI (AppRole vaultline-keys-admin), run by
# security/ops for KEK rotation. It can see the KEK's metadata, rotate it, rewrap stored data
# keys to the latest version and raise min_decryption_version. It cannot decrypt, create data
# keys, export, back up, delete or reconfigure the key in any other way.

path "transit/keys/vaultline-kek" {
  capabilities = ["read"]
}

path "transit/keys/vaultline-kek/rotate" {
  capabilities = ["update"]
}

# Only min_decryption_version may be set: exportable, allow_plaintext_backup and
# deletion_allowed are one-way or destructive switches that no runtime identity may flip.
path "transit/keys/vaultline-kek/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_decryption_version" = []
  }
}

path "transit/rewrap/vaultline-kek" {
  capabilities = ["update"]
}
