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
