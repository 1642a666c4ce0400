"""Benchmarks of tinykern's ops against the machine's measured ceilings and the usual baselines.

`python -m tinykern.bench` writes bench/results/<device>.json, .md and a roofline .png;
`pytest bench/ --benchmark-only` runs the same rows under pytest-benchmark. Modules: shapes (the
cases), cases (what each row runs and is charged for), timing, ceilings, machine, report, suite
(the CLI's loop), sd15 (the SD1.5 UNet's layer inventory by shape).
"""
