"""The few layers every model uses identically (attention, MLP, embeddings)."""
