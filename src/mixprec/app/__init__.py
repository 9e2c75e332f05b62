"""The application: the ``mixprec`` command and what it runs.

``cli`` parses the command line; ``cli_plan`` is the ``plan`` subcommand; ``runner`` trains one
precision on one task (run folder, checkpoints, metrics); ``report`` writes the comparison report;
``tasks`` holds the built-in tasks on data that ships offline. The library layers below never
import this package.
"""
