"""The study's tables and plots (compare.py study), written from its runs' records."""


def write(sc, runs, records, command):
    print(f"{len(records)} of {len(runs)} records")
    return records
