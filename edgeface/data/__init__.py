"""Face datasets: scanning and validating image folders, the preprocessing cache, downloads.

A dataset is a folder of `<identity>/<image>` files (LFW, ORL or your own). `ingest` lists and
decodes it, `cache` turns it into one uint8 array keyed by file content, and `fetch` downloads
LFW with its protocol files.
"""
