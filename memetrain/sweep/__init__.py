"""Sweeps: a grid of runs (``configs/sweep/``) expanded into jobs, run on Slurm as one submitit job
array per stage or one after another on this machine, waited for, then collected into tables.

``launch`` drives it (``launcher/sweep.py``); ``grid`` expands a sweep config into jobs; ``job`` is
one job as a submitit Checkpointable; ``launchers`` submit jobs and report their states;
``record`` keeps ``sweep.json``; ``monitor`` shows progress while waiting; ``collect`` (with
``runs``, ``reference``, ``render``, ``chart``) turns the results into mean ± std tables.
"""
