"""Before launching on a pod: will the step fit the slice (``plan``: ahead-of-time TPU compiles on
this machine) and will this host feed its chips (``bench``: the input pipeline's supply against the
cost model's demand). The top floor of the package: commands that read the trainer and the data."""
