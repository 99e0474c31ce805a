"""The authors' released weights: a safe reader and the import into our models."""
