"""Training DiffusionGemma-architecture models: objective, data, loop. Nothing in the package imports this."""
