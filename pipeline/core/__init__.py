"""What every phase shares: error codes, stage plumbing (progress, stop checks, atomic writes),
the job workspace, resource metering, child processes and the point-cloud/PLY helpers."""
