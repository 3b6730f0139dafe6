"""gRPC edge: servicers (proto <-> domain), the error table, the per-call context."""
