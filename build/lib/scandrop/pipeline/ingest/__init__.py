"""Ingest: turn a drop (folder, zip, video, single photo) into a clean, oriented photo set."""
