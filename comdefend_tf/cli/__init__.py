"""Command-line support shared by the binaries: console entry points and flags."""
