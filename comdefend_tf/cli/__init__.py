"""Command-line support shared by the binaries: console entry points (``console``), the shared
flags (``flags``) and the exit statuses (``exit_codes``)."""
