"""The one time limit of a test's child process (a script, a CLI run, a notebook kernel).

A child that hangs (a deadlock, a lock never released) fails its test with a timeout instead
of stalling the whole suite until CI's own limit. Generous: the slowest child, a CLI run that
compiles several models, takes about a minute on 2 loaded cores.
"""

TIMEOUT_S = 600
