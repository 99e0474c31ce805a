"""absl binaries that export and apply trained models (run as ``python -m export.<name>``)."""
