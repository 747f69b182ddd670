"""The `gistctl` command line: parsing, progress display and printing only."""
