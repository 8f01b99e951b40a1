"""The stored state: the users' concept banks, the face index, the output table and its schema, the suggested
people's table, the exports made from an output, the dataset folder a build writes and its formats, the leases
that admit one writer at a time, storage URIs, identifiers, a run's input scope, the byte-level search of
``plvm forget``, and the project's exceptions with their exit codes.

Everything here reads and writes files at fsspec URIs (local disks, S3, GCS); nothing of Ray."""
