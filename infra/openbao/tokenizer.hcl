# Policy "tokenizer": the tokenizer service (AppRole vaultline-tokenizer).
# It creates data keys and unwraps/rewraps them under the KEK "vaultline-kek" - nothing else:
# no key read, no rotation, no encrypt/decrypt of arbitrary data under other keys, no sys/.
# Roles get token_no_default_policy, so not even the "default" policy's self-lookup applies.

path "transit/datakey/plaintext/vaultline-kek" {
  capabilities = ["update"]
}

path "transit/datakey/wrapped/vaultline-kek" {
  capabilities = ["update"]
}

path "transit/decrypt/vaultline-kek" {
  capabilities = ["update"]
}

path "transit/rewrap/vaultline-kek" {
  capabilities = ["update"]
}
