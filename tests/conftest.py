"""Test configuration: real OpenBao and PostgreSQL fixtures (tests.fixtures.infra), a
tokenizer served in-process over real gRPC (tests.fixtures.tokenizer), and a state directory
for `vaultline dev up` run as a separate process (tests.fixtures.devstack)."""

pytest_plugins = ["tests.fixtures.infra", "tests.fixtures.tokenizer", "tests.fixtures.devstack"]
