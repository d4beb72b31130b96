"""Tiny random-weight models in users' real file formats, for tests and the smoke demo."""
