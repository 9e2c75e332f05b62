"""Built-in training tasks and the small models they use."""
