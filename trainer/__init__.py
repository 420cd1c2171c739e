"""The training program that runs in each training pod (and under `evaclip run --local`)."""
