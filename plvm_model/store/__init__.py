"""The stored state: the users' concept banks, the face index, the output table, the leases that admit one writer
at a time, storage URIs, identifiers, and the project's exceptions with their exit codes.

Everything here reads and writes files at fsspec URIs (local disks, S3, GCS); nothing of Ray.
"""
