"""The application: the job, the command line, recipes, data sets, reports and plots, run state
and checkpoints, data parallelism, export and timing.
"""
