"""Access control: mTLS identities, role policy, quotas, audit chain."""
