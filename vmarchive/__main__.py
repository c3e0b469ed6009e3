from vmarchive.cli import main

main()
