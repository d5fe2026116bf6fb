"""Sparse: structure from motion (cameras and tie points) and the job's world frame."""
