"""The shared training engine: one generic loop (:mod:`.loop`); models plug in as tasks (:mod:`.tasks`)."""
