"""Test configuration: real OpenBao and PostgreSQL fixtures (tests.fixtures.infra) and a
tokenizer served in-process over real gRPC (tests.fixtures.tokenizer)."""

pytest_plugins = ["tests.fixtures.infra", "tests.fixtures.tokenizer"]
