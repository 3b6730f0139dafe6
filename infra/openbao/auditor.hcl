# Policy "auditor": `vaultline audit verify` (AppRole vaultline-auditor). It reads the audit
# chain's checkpoints and verifies their signatures - nothing else: it cannot sign or write a
# checkpoint, and it touches no key of the card data.
# Roles get token_no_default_policy, so not even the "default" policy's self-lookup applies.

path "transit/verify/vaultline-audit" {
  capabilities = ["update"]
}

path "vaultline-kv/data/audit/checkpoints/*" {
  capabilities = ["read"]
}

path "vaultline-kv/metadata/audit/checkpoints/*" {
  capabilities = ["list"]
}
