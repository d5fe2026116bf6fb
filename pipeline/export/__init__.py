"""Export: the outbox files (GLB, PLY, .splat, cameras) and the preview image."""
