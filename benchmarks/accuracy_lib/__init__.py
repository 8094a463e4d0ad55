"""The pieces of `benchmarks/accuracy.py`: data sets, models, the training protocol, the
conversion experiment, and the report (plots and tables).

Nothing here is imported by the project's packages; it exists to measure them.
"""
