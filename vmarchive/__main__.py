from vmarchive.cli import run

run()
