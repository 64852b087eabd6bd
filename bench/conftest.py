"""pytest collects ``bench_*.py`` here (pyproject's ``python_files``) for the pytest-benchmark
suites (``bench_lookup.py``, ``bench_ssd.py``); the research scripts of ``exp/`` need a GPU and
are scripts, not suites: never collect them."""

collect_ignore = ["exp"]
