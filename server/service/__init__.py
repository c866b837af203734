"""The coordinator service: `silotune coordinator --serve` (issue 13).

One long-running coordinator keeps its SuperLink and gateway up, so agents stay
connected across jobs, and takes jobs from operators:

- ``store.py``: the jobs, one row each, in ``state_dir/jobs.sqlite`` (the
  dashboard reads it too);
- ``manager.py``: a worker thread that runs the queued jobs one at a time on the
  SuperLink and registers each finished one as a specialist
  (server/specialists.py); jobs left running by a crash are resumed first;
- ``api.py``: the jobs API (protos/silotune/v1/jobs.proto) over gRPC, mutual TLS
  with operator certificates only.

The operator's commands are server/cli/jobs.py (`silotune job …`,
`silotune specialist …`).
"""
