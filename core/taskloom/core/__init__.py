"""What every taskloom component shares: the domain model, plans, settings, errors,
LLM backends, gRPC helpers and the local Redis launcher."""
