"""absl binaries that train models and evaluate them (run as ``python -m train.<name>``)."""
