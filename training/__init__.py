"""Training of the shipped stand-in models (not part of the installed package: the runtime never trains)."""
