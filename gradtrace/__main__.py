from gradtrace.cli import entry_point

entry_point()
