"""Serving: the SavedModel signatures, the versioned export and the client."""
