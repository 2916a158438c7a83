"""SQLAlchemy's own test suite, run plain and with poolwatch watching every engine it creates.

``python -m sqla_suite`` (or ``scripts/sqla_suite.sh``) fetches the sdist of the installed
SQLAlchemy, prepares a database of its own, runs a subset of the suite twice and compares:

- ``sdist``: the suite's ``test/`` tree and config, taken from the sdist of the installed version
- ``database``: the ``sqla_suite`` database with the schemas the suite expects
- ``outcomes``: a pytest plugin loaded in both runs that records each test's outcome
- ``poolwatch_everywhere``: the pytest plugin of the watched run (poolwatch on every engine)
- ``compare``: the plain-vs-watched table, the watch checks and the exit code
- ``selfcheck`` / ``selfcheck_cases``: proof, before each run, that every check can fail
- ``__main__``: the command that ties them together
"""
