"""The runner: what runs a pipeline's list of steps, whatever the pipeline.

- ``settings``: its sections of the config (the Ray a run uses; how it treats failures of the system);
- ``execute``: a listing of photos through a list of steps, on Ray (started or joined first);
- ``loop``: the stage loop (each stage's contract and counters, the error policy, joined calls, barriers);
- ``failures``: a failed batch, and a run's failure as the driver reports it;
- ``preflight``: what is checked before any photo is read (the output can be written, the stages fit a node);
- ``runtime``: starting or joining Ray, quietly; ``ray_processes``: what a killed run's embedded Ray left;
- ``progress``: progress lines for runs without a terminal;
- ``counters``: the stages' counters as a run reports them; ``metrics``: a run's Prometheus metrics.

The compositions in ``pipelines`` (caption, rematch, enroll, evaluation, dataset) build the lists; nothing here
imports them.
"""
