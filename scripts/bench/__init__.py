"""The overhead benchmark behind `scripts/bench_overhead.py`, one job per module.

- `models`: the model zoo and its training step;
- `configs`: what each configuration installs, and the torch-state hygiene check;
- `load`: this process's memory and other processes' CPU while a block runs;
- `harness`: blocks of timed steps, interleaved in rounds;
- `grad_stats`: the gradient statistics' reductions against the bandwidth limit;
- `profile`: cProfile of a session's steps, and the long-run memory soak;
- `hooks`: host time inside each gradtrace hook;
- `tables`: the report's header facts and Markdown tables;
- `main`: the command line.
"""
