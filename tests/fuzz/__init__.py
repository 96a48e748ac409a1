"""Hostile-input builders and the atheris fuzzer (run by hand; nothing here is collected)."""
